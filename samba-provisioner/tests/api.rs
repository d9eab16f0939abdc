//! The HTTP API of `samba-provisioner serve`: bearer authentication, create, show,
//! list and revoke, spoken over plain HTTP/1.1 on loopback.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{all_output, TestEnv};

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(env: &TestEnv) -> Server {
    start_with_gc_interval(env, "1h")
}

fn start_with_gc_interval(env: &TestEnv, gc_interval: &str) -> Server {
    let port = free_port();
    let child = env
        .command()
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--gc-interval",
            gc_interval,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server { child, port };
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if request(&server, "GET", "/healthz", None, None).0 == 200 {
            return server;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("serve did not answer on port {port}");
}

/// Sends one request and returns the status and the JSON body.
fn request(
    server: &Server,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", server.port)) else {
        return (0, serde_json::Value::Null);
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let body = body.unwrap_or("");
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if let Some(token) = bearer {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();

    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let json = response
        .split_once("\r\n\r\n")
        .and_then(|(_, body)| serde_json::from_str(body).ok())
        .unwrap_or(serde_json::Value::Null);
    (status, json)
}

#[test]
fn api_requires_bearer_token() {
    let env = TestEnv::new("apiauth");
    let server = start(&env);

    let (status, body) = request(&server, "GET", "/v1/leases", None, None);
    assert_eq!(status, 401, "{body}");
    let (status, body) = request(&server, "GET", "/v1/leases", Some("wrong"), None);
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("bearer token"),
        "{body}"
    );
}

#[test]
fn api_lease_lifecycle() {
    let env = TestEnv::new("api");
    let token = std::fs::read_to_string(&env.api_token_file)
        .unwrap()
        .trim()
        .to_string();
    let server = start(&env);
    let dir = env.share_dir("session");
    std::fs::write(dir.join("model.step"), "STEP").unwrap();

    let body = serde_json::json!({"path": dir, "ttl": "15m", "label": "api session"}).to_string();
    let (status, created) = request(&server, "POST", "/v1/leases", Some(&token), Some(&body));
    assert_eq!(status, 201, "{created}");
    let id = created["lease"]["id"].as_str().unwrap().to_string();
    let lease_token = created["token"].as_str().unwrap().to_string();
    assert_eq!(created["lease"]["state"], "active");

    let mount = env.mount(&lease_token);
    assert_eq!(mount.lease_id, id);
    let output = env.smbclient(&mount.share, &mount, "ls");
    assert!(
        common::stdout(&output).contains("model.step"),
        "{}",
        all_output(&output)
    );

    let (status, shown) = request(
        &server,
        "GET",
        &format!("/v1/leases/{id}"),
        Some(&token),
        None,
    );
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["lease"]["label"], "api session");
    assert!(
        shown.to_string().find(&lease_token).is_none(),
        "show returns the token"
    );

    let (status, listed) = request(&server, "GET", "/v1/leases", Some(&token), None);
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["leases"].as_array().unwrap().len(), 1, "{listed}");

    let (status, revoked) = request(
        &server,
        "DELETE",
        &format!("/v1/leases/{id}"),
        Some(&token),
        None,
    );
    assert_eq!(status, 200, "{revoked}");
    let output = env.smbclient(&mount.share, &mount, "ls");
    assert!(
        !output.status.success(),
        "the revoked lease still works: {}",
        all_output(&output)
    );

    let (status, missing) = request(
        &server,
        "GET",
        &format!("/v1/leases/{id}"),
        Some(&token),
        None,
    );
    assert_eq!(status, 404, "{missing}");
    assert!(env.samba_objects().is_empty(), "{:?}", env.samba_objects());
}

#[test]
fn api_rejects_bad_requests() {
    let env = TestEnv::new("apibad");
    let token = std::fs::read_to_string(&env.api_token_file)
        .unwrap()
        .trim()
        .to_string();
    let server = start(&env);
    let dir = env.share_dir("d");

    let cases = [
        ("{not json", "invalid JSON"),
        (
            r#"{"path": "/etc", "ttl": "1h"}"#,
            "not inside an allowed root",
        ),
        (
            &*serde_json::json!({"path": dir, "ttl": "forever"}).to_string(),
            "TTL",
        ),
        (
            &*serde_json::json!({"path": dir, "ttl": "1h", "client_ip": "any"}).to_string(),
            "client IP",
        ),
        (
            &*serde_json::json!({"path": dir, "ttl": "1h", "owner": "x"}).to_string(),
            "unknown field",
        ),
    ];
    for (body, expected) in cases {
        let (status, answer) = request(&server, "POST", "/v1/leases", Some(&token), Some(body));
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains(expected),
            "{body}: {answer}"
        );
    }
    let (status, answer) = request(&server, "GET", "/v1/leases/..%2Fetc", Some(&token), None);
    assert_eq!(status, 400, "{answer}");
    let (status, _) = request(&server, "PUT", "/v1/leases", Some(&token), None);
    assert_eq!(status, 405);
    assert!(env.samba_objects().is_empty(), "{:?}", env.samba_objects());
}

#[test]
fn api_timer_revokes_expired_lease() {
    let env = TestEnv::new("apitimer");
    let token = std::fs::read_to_string(&env.api_token_file)
        .unwrap()
        .trim()
        .to_string();
    let server = start_with_gc_interval(&env, "1s");
    let dir = env.share_dir("d");

    let body = serde_json::json!({"path": dir, "ttl": "2s"}).to_string();
    let (status, created) = request(&server, "POST", "/v1/leases", Some(&token), Some(&body));
    assert_eq!(status, 201, "{created}");
    let id = created["lease"]["id"].as_str().unwrap().to_string();

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _) = request(
            &server,
            "GET",
            &format!("/v1/leases/{id}"),
            Some(&token),
            None,
        );
        if status == 404 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the timed gc did not revoke the expired lease"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(env.samba_objects().is_empty(), "{:?}", env.samba_objects());
}
