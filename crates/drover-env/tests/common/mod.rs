//! Helpers the supervisor and provider tests share.

use std::time::Duration;

use drover_env::supervisor::{Instance, InstanceState};

/// Waits (at most 20 s) until the instance's state satisfies `done`; returns that state.
pub(crate) async fn wait_for(
    instance: &Instance,
    what: &str,
    done: impl Fn(&InstanceState) -> bool,
) -> InstanceState {
    let mut watch = instance.watch();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let state = watch.borrow_and_update().clone();
        if done(&state) {
            return state;
        }
        tokio::select! {
            _ = watch.changed() => {}
            () = tokio::time::sleep_until(deadline) => panic!("timed out waiting for {what}; last state {state:?}"),
        }
    }
}
