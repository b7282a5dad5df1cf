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

/// Lists services over v1 reflection on `channel`; the status when refused.
async fn list_services(channel: tonic::transport::Channel) -> Result<Vec<String>, tonic::Status> {
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel);
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let response = responses.next().await.expect("a response")?;
    match response.message_response {
        Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        other => panic!("unexpected v1 reflection response: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_production_vault_does_not_answer_reflection_unless_configured() {
    // The attack: map every RPC of a production vault with grpcurl.
    let s = crate::access::secure(Backend::Sqlite).await;
    let refused = list_services(s.app.channel().await)
        .await
        .expect_err("reflection answered outside --dev");
    assert_eq!(refused.code(), tonic::Code::Unimplemented, "{refused:?}");

    let s = crate::access::secure_with(Backend::Sqlite, |settings| {
        settings.grpc.reflection = Some(true);
    })
    .await;
    let names = list_services(s.app.channel().await)
        .await
        .expect("reflection when grpc.reflection = true");
    assert!(
        names.iter().any(|n| n == "cardvault.v1.CardVault"),
        "{names:?}"
    );
}
