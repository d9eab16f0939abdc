//! Requests in flight, shared by every caller that asks for the same key meanwhile.
//!
//! Invariant: at most one request per key can be joined at a time. Each request runs in
//! its own tokio task, so it completes even if every caller goes away, and it leaves
//! the map when it completes. [`InFlight::cancel`] detaches a request, so later callers
//! start a new one instead of joining a request that started before a change.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::future::{BoxFuture, FutureExt, Shared};

type SharedRequest<V> = Shared<BoxFuture<'static, V>>;

/// Map from key to the request in flight for it, each with the id that lets only its
/// own task remove it.
pub struct InFlight<K, V: Clone> {
    requests: Arc<Mutex<HashMap<K, (u64, SharedRequest<V>)>>>,
    next_id: Arc<AtomicU64>,
}

impl<K, V: Clone> Clone for InFlight<K, V> {
    fn clone(&self) -> Self {
        InFlight {
            requests: Arc::clone(&self.requests),
            next_id: Arc::clone(&self.next_id),
        }
    }
}

impl<K, V: Clone> Default for InFlight<K, V> {
    fn default() -> Self {
        InFlight {
            requests: Arc::default(),
            next_id: Arc::default(),
        }
    }
}

impl<K, V> InFlight<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn lock(&self) -> MutexGuard<'_, HashMap<K, (u64, SharedRequest<V>)>> {
        self.requests.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `request` for `key`, or joins the request of `key` already in flight.
    /// `request` is only polled when no request of `key` is in flight.
    pub async fn run<F>(&self, key: K, request: F) -> V
    where
        F: Future<Output = V> + Send + 'static,
    {
        let shared = {
            let mut requests = self.lock();
            match requests.get(&key) {
                Some((_, shared)) => shared.clone(),
                None => {
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    let map = self.clone();
                    let task_key = key.clone();
                    let task = tokio::spawn(async move {
                        let value = request.await;
                        let mut requests = map.lock();
                        if requests.get(&task_key).is_some_and(|(running, _)| *running == id) {
                            requests.remove(&task_key);
                        }
                        value
                    });
                    let shared = async move { task.await.expect("an in-flight request task panicked") }.boxed().shared();
                    requests.insert(key, (id, shared.clone()));
                    shared
                }
            }
        };
        shared.await
    }

    /// Detaches the request of `key` in flight, if any: its callers still get its
    /// result, and the next caller starts a new request.
    pub fn cancel(&self, key: &K) {
        self.lock().remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn callers_share_one_request() {
        let in_flight: InFlight<&'static str, u32> = InFlight::default();
        let sent = Arc::new(AtomicU64::new(0));
        let request = |sent: Arc<AtomicU64>| async move {
            sent.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            7
        };
        let (a, b) = tokio::join!(
            in_flight.run("k", request(Arc::clone(&sent))),
            in_flight.run("k", request(Arc::clone(&sent)))
        );
        assert_eq!((a, b), (7, 7));
        assert_eq!(sent.load(Ordering::SeqCst), 1, "the second caller joined the first request");

        in_flight.run("k", request(Arc::clone(&sent))).await;
        assert_eq!(sent.load(Ordering::SeqCst), 2, "a finished request is not reused");
    }

    #[tokio::test]
    async fn cancelled_request_is_not_joined() {
        let in_flight: InFlight<&'static str, u32> = InFlight::default();
        let slow = in_flight.run("k", async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            1
        });
        let joined = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            in_flight.cancel(&"k");
            in_flight.run("k", async { 2 }).await
        };
        let (first, second) = tokio::join!(slow, joined);
        assert_eq!(first, 1);
        assert_eq!(second, 2, "the request after cancel ran on its own");
    }
}
