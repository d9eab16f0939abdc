//! A fault-injecting HTTP proxy on 127.0.0.1 in front of Garage.
//!
//! Each request is forwarded on its own upstream connection with `Connection: close`,
//! so the proxy sees every request and can answer it with 503 SlowDown, delay it, or
//! count it. It only ever connects to the upstream address it was given.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
struct State {
    fail_next: AtomicU32,
    fail_all: AtomicBool,
    delay_ms: AtomicU64,
    /// Request lines ("GET /bucket/key?... HTTP/1.1", followed by " [Range: ...]" when
    /// the request has a range) seen so far.
    requests: Mutex<Vec<String>>,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    state: Arc<State>,
    runtime: Option<tokio::runtime::Runtime>,
}

const SLOW_DOWN: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";

impl FaultProxy {
    /// Starts a proxy to `upstream` (an `http://127.0.0.1:PORT` endpoint).
    pub fn start(upstream: &str) -> FaultProxy {
        let upstream_addr: SocketAddr = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("upstream is http://IP:PORT");
        assert!(upstream_addr.ip().is_loopback(), "the proxy only forwards to loopback");

        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(State::default());
        let accept_state = Arc::clone(&state);
        runtime.spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                let state = Arc::clone(&accept_state);
                tokio::spawn(async move {
                    let _ = handle(client, upstream_addr, state).await;
                });
            }
        });
        FaultProxy { addr, state, runtime: Some(runtime) }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Fails the next `count` requests with 503 SlowDown.
    pub fn fail_next(&self, count: u32) {
        self.state.fail_next.store(count, Ordering::SeqCst);
    }

    /// Fails every request with 503 SlowDown until switched off.
    pub fn fail_all(&self, on: bool) {
        self.state.fail_all.store(on, Ordering::SeqCst);
    }

    pub fn delay(&self, delay: Duration) {
        self.state.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Request lines seen so far.
    pub fn requests(&self) -> Vec<String> {
        self.state.requests.lock().unwrap().clone()
    }

    pub fn clear_requests(&self) {
        self.state.requests.lock().unwrap().clear();
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn read_head(client: &mut TcpStream) -> std::io::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buffer.split_off(end + 4);
            return Ok(Some((buffer, rest)));
        }
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

async fn handle(mut client: TcpStream, upstream: SocketAddr, state: Arc<State>) -> std::io::Result<()> {
    let Some((head, body_start)) = read_head(&mut client).await? else { return Ok(()) };
    let head_text = String::from_utf8_lossy(&head).to_string();
    let mut request_line = head_text.lines().next().unwrap_or_default().to_string();
    if let Some(range) = head_text.lines().find(|l| l.to_ascii_lowercase().starts_with("range:")) {
        request_line.push_str(&format!(" [{}]", range.trim()));
    }
    state.requests.lock().unwrap().push(request_line);

    let fail = state.fail_all.load(Ordering::SeqCst)
        || state.fail_next.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
    if fail {
        let response = format!(
            "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{SLOW_DOWN}",
            SLOW_DOWN.len()
        );
        client.write_all(response.as_bytes()).await?;
        client.shutdown().await?;
        return Ok(());
    }

    let delay = state.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }

    let mut rewritten = String::new();
    for (index, line) in head_text.split("\r\n").enumerate() {
        if line.is_empty() {
            continue;
        }
        if index > 0 && line.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        rewritten.push_str(line);
        rewritten.push_str("\r\n");
    }
    rewritten.push_str("Connection: close\r\n\r\n");

    let mut server = TcpStream::connect(upstream).await?;
    server.write_all(rewritten.as_bytes()).await?;
    server.write_all(&body_start).await?;
    tokio::io::copy_bidirectional(&mut client, &mut server).await?;
    Ok(())
}
