//! The card domain: validated card data and the tokens that stand in for it. No I/O.
//!
//! The types here carry the security rules so callers cannot forget them:
//!
//! - [`Pan`] is the only way to hold a card number. It is validated on construction
//!   (digits, length, Luhn), zeroized on drop, masked in `Debug`, and has no `Display`;
//!   the digits come out only through [`Pan::expose_digits`], to encrypt or fingerprint.
//! - [`CardholderName`] and [`Cvc`] are zeroized and redacted the same way.
//! - [`Card::parse`] validates a whole [`CardInput`] and reports every broken field as a
//!   [`FieldViolation`] whose description explains the rule and never repeats the value.
//! - [`Token`]s come from the CSPRNG, never from the PAN; a PAN-shaped token always fails
//!   the Luhn check, so it can never be mistaken for (or equal) a card number.
//!
//! # Layout
//!
//! - `pan` — [`Pan`] and [`PanError`].
//! - [`luhn`] — the mod 10 checksum.
//! - `brand` — [`Brand`] from IIN ranges, kept as a data table.
//! - `expiry` — [`Expiry`] and [`ExpiryError`].
//! - `holder` — [`CardholderName`] and [`HolderError`].
//! - `cvc` — [`Cvc`] and [`CvcError`].
//! - `input` — [`Card`] and [`CardInput`]: all fields validated together.
//! - `error` — [`FieldViolation`] and [`InvalidCard`], the report sent back to callers.
//! - `token` — [`Token`], [`TokenFormat`] and [`TokenError`].
//! - [`detect`] — card numbers in free text, for the screens and scrubbers of text that is
//!   stored in clear or logged.

mod brand;
mod cvc;
pub mod detect;
mod error;
mod expiry;
mod holder;
mod input;
pub mod luhn;
mod pan;
mod token;

pub use brand::Brand;
pub use cvc::{Cvc, CvcError};
pub use detect::contains_card_number;
pub use error::{FieldViolation, InvalidCard};
pub use expiry::{Expiry, ExpiryError};
pub use holder::{CardholderName, HolderError};
pub use input::{Card, CardInput};
pub use pan::{Pan, PanError};
pub use token::{Token, TokenError, TokenFormat};
