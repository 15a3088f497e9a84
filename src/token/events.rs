//! Which keys got a new token: what the daemon's consumers (config mode's file, auth-query
//! mode's pools) need to touch exactly what changed.

use super::TokenKey;
use std::collections::HashSet;
use tokio::sync::broadcast;

/// How many events a consumer may fall behind before it is told to take everything anew. A
/// burst bigger than this (a thousand keys minted at start-up) costs a laggard one full pass.
pub(super) const BACKLOG: usize = 1024;

/// The keys minted since a consumer last looked.
#[derive(Debug, PartialEq, Eq)]
pub enum Changed {
    Keys(HashSet<TokenKey>),
    /// The consumer fell behind and lost track of which keys changed: any may have.
    All,
}

impl Changed {
    pub fn contains(&self, key: &TokenKey) -> bool {
        match self {
            Changed::Keys(keys) => keys.contains(key),
            Changed::All => true,
        }
    }
}

/// One consumer's view of the token source's events (`TokenSource::subscribe`).
pub struct KeyEvents {
    receiver: broadcast::Receiver<TokenKey>,
}

impl KeyEvents {
    pub(super) fn new(receiver: broadcast::Receiver<TokenKey>) -> Self {
        Self { receiver }
    }

    /// Waits for a key to get a new token, then takes every event already queued with it, so
    /// that a burst is handled in one pass. `None` once the token source is gone.
    pub async fn next(&mut self) -> Option<Changed> {
        use broadcast::error::{RecvError, TryRecvError};
        let mut changed = match self.receiver.recv().await {
            Ok(key) => Changed::Keys(HashSet::from([key])),
            Err(RecvError::Lagged(_)) => Changed::All,
            Err(RecvError::Closed) => return None,
        };
        loop {
            match (self.receiver.try_recv(), &mut changed) {
                (Ok(key), Changed::Keys(keys)) => {
                    keys.insert(key);
                }
                (Ok(_), Changed::All) => {}
                (Err(TryRecvError::Lagged(_)), _) => changed = Changed::All,
                (Err(TryRecvError::Empty | TryRecvError::Closed), _) => return Some(changed),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::TokenKind;

    fn key(user: &str) -> TokenKey {
        TokenKey {
            kind: TokenKind::Rds,
            host: "db.example".to_owned(),
            port: 5432,
            user: user.to_owned(),
            region: "eu-west-1".to_owned(),
            role: None,
        }
    }

    #[tokio::test]
    async fn a_burst_is_one_batch_of_its_distinct_keys() {
        let (sender, receiver) = broadcast::channel(BACKLOG);
        let mut events = KeyEvents::new(receiver);
        for user in ["a", "b", "a", "c"] {
            sender.send(key(user)).unwrap();
        }
        let batch = events.next().await.expect("a batch");
        assert_eq!(
            batch,
            Changed::Keys(["a", "b", "c"].map(key).into_iter().collect())
        );
        sender.send(key("d")).unwrap();
        assert_eq!(
            events.next().await,
            Some(Changed::Keys(HashSet::from([key("d")])))
        );
        drop(sender);
        assert_eq!(events.next().await, None);
    }

    #[tokio::test]
    async fn a_consumer_that_lags_is_told_everything_may_have_changed() {
        let (sender, receiver) = broadcast::channel(2);
        let mut events = KeyEvents::new(receiver);
        for user in ["a", "b", "c", "d"] {
            sender.send(key(user)).unwrap();
        }
        let batch = events.next().await.expect("a batch");
        assert_eq!(batch, Changed::All);
        assert!(batch.contains(&key("z")));
        // What was queued after the loss was taken with it: the next batch is new events only.
        sender.send(key("e")).unwrap();
        assert_eq!(
            events.next().await,
            Some(Changed::Keys(HashSet::from([key("e")])))
        );
    }
}
