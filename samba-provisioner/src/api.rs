//! The HTTP API of `samba-provisioner serve`, for the interactive compute service.
//!
//! Routes (JSON bodies, `Authorization: Bearer <samba.api_token>` on every route but
//! `/healthz`):
//! - `POST /v1/leases` with `{"path", "ttl", "read_only"?, "client_ip"?, "label"?}`
//!   creates a lease and returns `201 {"lease", "token"}`;
//! - `GET /v1/leases` lists leases, `GET /v1/leases/ID` shows one;
//! - `DELETE /v1/leases/ID` revokes one; `POST /v1/gc` runs gc now.
//!
//! Samba work blocks on child processes, so every request runs on tokio's blocking
//! pool. The server also runs gc on a timer. Logs carry method, route and status,
//! never a body, because bodies carry tokens.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use zeroize::Zeroizing;

use crate::confine::parse_client_ip;
use crate::provisioner::{GrantRequest, Provisioner};
use crate::ProvisionError;

/// Largest request body accepted; a grant request is a few hundred bytes.
const MAX_BODY_BYTES: usize = 64 * 1024;

type ApiResponse = Response<Full<Bytes>>;

struct ApiState {
    provisioner: Arc<Provisioner>,
    bearer_token: Zeroizing<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateLease {
    path: String,
    /// Duration text such as `"8h"` or `"90m"`.
    ttl: String,
    #[serde(default)]
    read_only: bool,
    client_ip: Option<String>,
    label: Option<String>,
}

/// Serves the API on `listener` until the future `shutdown` completes, running gc
/// every `gc_interval`.
pub async fn serve(
    provisioner: Arc<Provisioner>,
    bearer_token: Zeroizing<String>,
    listener: TcpListener,
    gc_interval: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let state = Arc::new(ApiState {
        provisioner: provisioner.clone(),
        bearer_token,
    });
    let gc_task = tokio::spawn(run_gc_timer(provisioner, gc_interval));
    tracing::info!(address = %listener.local_addr()?, "serving the lease API");

    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "accept failed");
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| handle(state.clone(), peer, request));
            if let Err(err) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, error = %err, "connection ended with an error");
            }
        });
    }

    gc_task.abort();
    tracing::info!("stopped serving the lease API");
    Ok(())
}

async fn run_gc_timer(provisioner: Arc<Provisioner>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick fires at once; the caller ran gc before serving.
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let provisioner = provisioner.clone();
        match tokio::task::spawn_blocking(move || provisioner.gc()).await {
            Ok(Ok(_report)) => {}
            Ok(Err(err)) => tracing::error!(error = %err, "timed gc failed"),
            Err(err) => tracing::error!(error = %err, "timed gc panicked"),
        }
    }
}

async fn handle(
    state: Arc<ApiState>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Result<ApiResponse, Infallible> {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let response = route(&state, request).await;
    tracing::info!(%peer, %method, path, status = response.status().as_u16(), "API request");
    Ok(response)
}

async fn route(state: &ApiState, request: Request<Incoming>) -> ApiResponse {
    let path = request.uri().path().to_string();
    if path == "/healthz" {
        return json_response(StatusCode::OK, json!({"status": "ok"}));
    }
    if !authorized(state, &request) {
        let mut response = error_response(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token; send `Authorization: Bearer <samba.api_token>`",
        );
        response.headers_mut().insert(
            WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Bearer"),
        );
        return response;
    }

    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = request.method().clone();
    match (method, segments.as_slice()) {
        (Method::POST, ["v1", "leases"]) => create(state, request).await,
        (Method::GET, ["v1", "leases"]) => {
            blocking(
                state,
                |p| p.list().map(|leases| json!({ "leases": leases })),
                StatusCode::OK,
            )
            .await
        }
        (Method::GET, ["v1", "leases", id]) => {
            let id = id.to_string();
            blocking(
                state,
                move |p| p.show(&id).map(|lease| json!({ "lease": lease })),
                StatusCode::OK,
            )
            .await
        }
        (Method::DELETE, ["v1", "leases", id]) => {
            let id = id.to_string();
            blocking(
                state,
                move |p| p.revoke(&id).map(|lease| json!({ "revoked": lease })),
                StatusCode::OK,
            )
            .await
        }
        (Method::POST, ["v1", "gc"]) => {
            blocking(
                state,
                |p| p.gc().map(|report| json!({ "gc": report })),
                StatusCode::OK,
            )
            .await
        }
        (_, ["v1", "leases"] | ["v1", "leases", _] | ["v1", "gc"]) => error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed on this route",
        ),
        _ => error_response(StatusCode::NOT_FOUND, "no such route; see /v1/leases"),
    }
}

fn authorized(state: &ApiState, request: &Request<Incoming>) -> bool {
    let Some(value) = request.headers().get(AUTHORIZATION) else {
        return false;
    };
    let Some(presented) = value.as_bytes().strip_prefix(b"Bearer ") else {
        return false;
    };
    presented.ct_eq(state.bearer_token.as_bytes()).into()
}

async fn create(state: &ApiState, request: Request<Incoming>) -> ApiResponse {
    let body = match Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("the request body is unreadable or larger than {MAX_BODY_BYTES} bytes"),
            )
        }
    };
    let create: CreateLease = match serde_json::from_slice(&body) {
        Ok(create) => create,
        Err(err) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                &format!(
                "invalid JSON body: {err}; send {{\"path\": \"/datanet/...\", \"ttl\": \"8h\"}}"
            ),
            )
        }
    };
    let grant_request = match grant_request(create) {
        Ok(request) => request,
        Err(err) => return provision_error_response(&err),
    };
    blocking(
        state,
        move |p| {
            p.grant(&grant_request)
                .map(|grant| serde_json::to_value(grant).unwrap_or_default())
        },
        StatusCode::CREATED,
    )
    .await
}

fn grant_request(create: CreateLease) -> Result<GrantRequest, ProvisionError> {
    let ttl = humantime::parse_duration(&create.ttl).map_err(|err| {
        ProvisionError::invalid(
            "TTL",
            &create.ttl,
            format!("{err}; write e.g. \"8h\" or \"90m\""),
        )
    })?;
    let client_ip = create
        .client_ip
        .as_deref()
        .map(parse_client_ip)
        .transpose()?;
    Ok(GrantRequest {
        path: create.path.into(),
        ttl,
        read_only: create.read_only,
        client_ip,
        label: create.label,
    })
}

async fn blocking<F>(state: &ApiState, work: F, success: StatusCode) -> ApiResponse
where
    F: FnOnce(&Provisioner) -> Result<serde_json::Value, ProvisionError> + Send + 'static,
{
    let provisioner = state.provisioner.clone();
    match tokio::task::spawn_blocking(move || work(&provisioner)).await {
        Ok(Ok(value)) => json_response(success, value),
        Ok(Err(err)) => provision_error_response(&err),
        Err(err) => {
            tracing::error!(error = %err, "request handler panicked");
            error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error; see the server log",
            )
        }
    }
}

fn provision_error_response(err: &ProvisionError) -> ApiResponse {
    let status = match err {
        ProvisionError::LeaseNotFound { .. } => StatusCode::NOT_FOUND,
        _ if err.is_client_error() => StatusCode::BAD_REQUEST,
        _ => {
            tracing::error!(error = %err, "request failed");
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    error_response(status, &err.to_string())
}

fn error_response(status: StatusCode, message: &str) -> ApiResponse {
    json_response(status, json!({ "error": message }))
}

fn json_response(status: StatusCode, value: serde_json::Value) -> ApiResponse {
    let mut body = serde_json::to_vec(&value).unwrap_or_default();
    body.push(b'\n');
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}
