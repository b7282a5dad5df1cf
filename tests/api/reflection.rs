//! Server reflection answers on both protocol versions: grpcurl 1.8 and Python's
//! grpcio-reflection speak only v1alpha; newer clients speak v1.

use tokio_stream::StreamExt;
use tonic_reflection::pb::{v1, v1alpha};

use crate::helpers::{Backend, spawn_app};

const EXPECTED: [&str; 3] = [
    "cardvault.v1.CardVault",
    "cardvault.v1.KeyAdmin",
    "grpc.health.v1.Health",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services_on_v1_and_v1alpha() {
    let app = spawn_app(Backend::Sqlite).await;
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(app.channel().await);
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("v1 reflection")
        .into_inner();
    let response = responses.next().await.expect("a response").expect("ok");
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("unexpected v1 reflection response");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for name in EXPECTED {
        assert!(
            names.iter().any(|n| n == name),
            "v1 lists {name}: {names:?}"
        );
    }

    let mut client =
        v1alpha::server_reflection_client::ServerReflectionClient::new(app.channel().await);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "google.rpc.BadRequest".to_owned(),
            ),
        ),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("v1alpha reflection")
        .into_inner();
    let response = responses.next().await.expect("a response").expect("ok");
    assert!(
        matches!(
            response.message_response,
            Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
        ),
        "error detail types are resolvable, so clients can decode BadRequest"
    );
}
