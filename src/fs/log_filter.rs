//! Which of `fuser`'s log lines are not errors. `fuser` logs "Failed to send FUSE reply" at
//! ERROR whenever writing a reply to `/dev/fuse` fails. With ENOENT that only means the
//! kernel no longer holds the request: it was interrupted, or the connection was aborted
//! because the mount is going away (a worker answering a request while the unmount runs).
//! Nobody waits for such a reply, and nothing is lost; [`StaleReplyFilter`] keeps that one
//! case out of the log, so that an ERROR line from walfs always means something went wrong.
//! Every other failed reply is still logged.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// A tracing layer that drops `fuser`'s report of a reply to a request the kernel has
/// already ended (ENOENT).
pub struct StaleReplyFilter;

/// The fields of an event this filter looks at, written out.
#[derive(Default)]
struct Fields {
    message: String,
    /// The target of a record that came through the `log` bridge (its own metadata says
    /// "log").
    log_target: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "log.target" => self.log_target = format!("{value:?}"),
            _ => {}
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_string(),
            "log.target" => self.log_target = value.to_string(),
            _ => {}
        }
    }
}

const FUSER_REPLY: &str = "fuser::reply";

/// Whether a `fuser::reply` message reports a reply the kernel no longer wanted.
fn is_stale_reply(message: &str) -> bool {
    message.starts_with("Failed to send FUSE reply") && message.ends_with("(os error 2)")
}

impl<S: Subscriber> Layer<S> for StaleReplyFilter {
    fn event_enabled(&self, event: &Event<'_>, _: Context<'_, S>) -> bool {
        let target = event.metadata().target();
        if target != FUSER_REPLY && target != "log" {
            return true;
        }
        let mut f = Fields::default();
        event.record(&mut f);
        let from_fuser = target == FUSER_REPLY || f.log_target == FUSER_REPLY;
        !(from_fuser && is_stale_reply(&f.message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tracing_subscriber::layer::SubscriberExt;

    struct Count(Arc<AtomicUsize>);

    impl<S: Subscriber> Layer<S> for Count {
        fn on_event(&self, _: &Event<'_>, _: Context<'_, S>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn only_replies_to_ended_requests_are_dropped() {
        let seen = Arc::new(AtomicUsize::new(0));
        let subscriber = tracing_subscriber::registry()
            .with(StaleReplyFilter)
            .with(Count(seen.clone()));
        tracing::subscriber::with_default(subscriber, || {
            // As `fuser` logs it through the `log` bridge: target "log", the record's
            // target a field.
            tracing::event!(
                target: "log",
                tracing::Level::ERROR,
                log.target = "fuser::reply",
                "Failed to send FUSE reply: No such file or directory (os error 2)"
            );
            // And as a tracing event of its own.
            tracing::error!(
                target: "fuser::reply",
                "Failed to send FUSE reply: No such file or directory (os error 2)"
            );
        });
        assert_eq!(seen.load(Ordering::Relaxed), 0);
        let subscriber = tracing_subscriber::registry()
            .with(StaleReplyFilter)
            .with(Count(seen.clone()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(
                target: "fuser::reply",
                "Failed to send FUSE reply: Invalid argument (os error 22)"
            );
            tracing::error!(target: "walfs::fs", "Failed to send FUSE reply: (os error 2)");
            tracing::event!(
                target: "log",
                tracing::Level::ERROR,
                log.target = "other",
                "Failed to send FUSE reply: (os error 2)"
            );
            tracing::info!("something else");
        });
        assert_eq!(seen.load(Ordering::Relaxed), 4);
    }
}
