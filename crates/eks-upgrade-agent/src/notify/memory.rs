//! [`InMemoryEventSink`]: keeps what it receives; can be told to fail, for tests of the
//! dispatcher and of the code that produces notifications.

use std::sync::Mutex;

use super::{EntryResult, EventSink, Kinds, Notification};

type Rule = Box<dyn Fn(&Notification) -> Option<EntryResult> + Send + Sync>;

/// A sink that records notifications in memory.
pub struct InMemoryEventSink {
    name: String,
    kinds: Kinds,
    received: Mutex<Vec<Notification>>,
    calls: Mutex<Vec<usize>>,
    rule: Mutex<Option<Rule>>,
}

impl std::fmt::Debug for InMemoryEventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryEventSink")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl InMemoryEventSink {
    /// An empty sink called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        InMemoryEventSink {
            name: name.into(),
            kinds: Kinds::Events,
            received: Mutex::new(Vec::new()),
            calls: Mutex::new(Vec::new()),
            rule: Mutex::new(None),
        }
    }

    /// The same sink taking in `kinds` (trace-only types too with [`Kinds::All`], as the OTLP
    /// sink does).
    pub fn with_kinds(mut self, kinds: Kinds) -> Self {
        self.kinds = kinds;
        self
    }

    /// Sets a rule deciding the fate of each entry (`None` from the rule means delivered);
    /// `None` clears it.
    pub fn set_rule(&self, rule: Option<Rule>) {
        *self.rule.lock().unwrap_or_else(|p| p.into_inner()) = rule;
    }

    /// Everything delivered so far, in order (duplicates included).
    pub fn received(&self) -> Vec<Notification> {
        self.received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Batch sizes of every call.
    pub fn calls(&self) -> Vec<usize> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl EventSink for InMemoryEventSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn kinds(&self) -> Kinds {
        self.kinds
    }

    fn deliver(&self, batch: &[Notification]) -> Vec<EntryResult> {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(batch.len());
        let rule = self.rule.lock().unwrap_or_else(|p| p.into_inner());
        let mut received = self.received.lock().unwrap_or_else(|p| p.into_inner());
        batch
            .iter()
            .map(|n| match rule.as_ref().and_then(|r| r(n)) {
                Some(result) => result,
                None => {
                    received.push(n.clone());
                    EntryResult::Delivered
                }
            })
            .collect()
    }
}
