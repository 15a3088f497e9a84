//! The connections of a listener that have not logged in yet, oldest first.
//!
//! A flood of connections that say nothing (or say it slowly) would otherwise hold every slot
//! until the handshake timeout, and PgBouncer's own login would be refused "too many
//! clients". When every slot is taken, the listener closes the oldest connection that has not
//! logged in to make room for the new one: PgBouncer logs in within milliseconds of
//! connecting, so the oldest unauthenticated connection is almost always the flood's, and
//! sessions that did log in keep their slots.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::task::AbortHandle;

#[derive(Debug, Clone, Default)]
pub(crate) struct PreAuthSet {
    inner: Arc<Mutex<Waiting>>,
}

#[derive(Debug, Default)]
struct Waiting {
    next: u64,
    /// By arrival; the task once spawned (`None` in between).
    tasks: BTreeMap<u64, Option<AbortHandle>>,
}

impl PreAuthSet {
    /// A new connection's place in the set, until it logs in or ends; [`PreAuthSet::attach`]
    /// its task once spawned.
    pub(crate) fn enter(&self) -> PreAuth {
        let mut waiting = self.inner.lock().expect("pre-auth lock");
        let id = waiting.next;
        waiting.next += 1;
        waiting.tasks.insert(id, None);
        PreAuth {
            id,
            set: Some(self.clone()),
        }
    }

    /// Records the task of connection `id`, unless it has logged in or ended already.
    pub(crate) fn attach(&self, id: u64, task: AbortHandle) {
        let mut waiting = self.inner.lock().expect("pre-auth lock");
        if let Some(slot) = waiting.tasks.get_mut(&id) {
            *slot = Some(task);
        }
    }

    /// Closes the oldest connection that has not logged in; false if there is none.
    pub(crate) fn evict_oldest(&self) -> bool {
        let mut waiting = self.inner.lock().expect("pre-auth lock");
        let oldest = waiting
            .tasks
            .iter()
            .find_map(|(&id, task)| task.as_ref().map(|_| id));
        let Some(task) = oldest.and_then(|id| waiting.tasks.remove(&id)).flatten() else {
            return false;
        };
        task.abort();
        true
    }
}

/// A connection's place in its listener's [`PreAuthSet`]; it leaves the set when this drops.
#[derive(Debug)]
pub(crate) struct PreAuth {
    id: u64,
    set: Option<PreAuthSet>,
}

impl PreAuth {
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// In no set: for connections no listener accepted (the fuzz targets).
    #[cfg(any(fuzzing, test))]
    pub(crate) fn detached() -> Self {
        Self { id: 0, set: None }
    }

    /// The connection has logged in: it can no longer be closed to make room.
    pub(crate) fn authenticated(self) {}
}

impl Drop for PreAuth {
    fn drop(&mut self) {
        if let Some(set) = &self.set {
            set.inner
                .lock()
                .expect("pre-auth lock")
                .tasks
                .remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_oldest_unauthenticated_connection_goes_first() {
        let set = PreAuthSet::default();
        let mut places = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..3 {
            let place = set.enter();
            let task = tokio::spawn(std::future::pending::<()>());
            set.attach(place.id(), task.abort_handle());
            places.push(place);
            tasks.push(task);
        }
        // The first logs in: the second is now the oldest that has not.
        places.remove(0).authenticated();
        assert!(set.evict_oldest());
        assert!((&mut tasks[1]).await.unwrap_err().is_cancelled());
        assert!(!tasks[0].is_finished() && !tasks[2].is_finished());
        assert!(set.evict_oldest());
        assert!((&mut tasks[2]).await.unwrap_err().is_cancelled());
        assert!(!set.evict_oldest(), "none left that has not logged in");
        assert!(!tasks[0].is_finished());
    }
}
