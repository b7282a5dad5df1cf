//! Stored record blobs come from the database, which an attacker with database access
//! controls: parsing them must never panic, and nothing but the real blob may open.

#![no_main]

use std::sync::OnceLock;

use cardvault::crypto::{DataKey, DekId, open_record, record_dek_id, seal_record};
use libfuzzer_sys::fuzz_target;

fn key() -> &'static (DataKey, DekId, Vec<u8>) {
    static KEY: OnceLock<(DataKey, DekId, Vec<u8>)> = OnceLock::new();
    KEY.get_or_init(|| {
        let key = DataKey::from_bytes(&[7u8; 32]).expect("32 bytes");
        let id = DekId(uuid::Uuid::from_bytes([1; 16]));
        let sealed = seal_record(&key, id, "t", "tok", b"secret").expect("seal");
        (key, id, sealed)
    })
}

fuzz_target!(|data: &[u8]| {
    let (key, _, sealed) = key();
    let _ = record_dek_id(data);
    let opened = open_record(key, "t", "tok", data);
    // Only the genuine blob authenticates.
    if opened.is_ok() {
        assert_eq!(data, sealed.as_slice());
    }
});
