//! The state all visitors of one deserialization share: the path they are at, the last error
//! they raised, the budget of data they may still build, and the text, whose borrowed strings
//! reveal where they are in the file.

use crate::jobfile::locate::{Failure, Seg};
use serde::de;
use std::cell::{Cell, RefCell};

/// A weight charged to the budget for every value built, on top of its text's length: about
/// what a node costs in memory.
pub(super) const NODE_WEIGHT: usize = 16;

/// State shared by all visitors of one deserialization.
pub(crate) struct Ctx<'de> {
    /// The document text: strings borrowed from it reveal their offset.
    text: &'de str,
    /// Where the visitors are. Steps are popped only after success, so on an error the path
    /// still leads to the node that failed.
    path: RefCell<Vec<Seg>>,
    /// The last error raised by these visitors.
    failure: RefCell<Option<Failure>>,
    /// What may still be built, in weight units (see [`NODE_WEIGHT`]).
    budget: Cell<usize>,
}

impl<'de> Ctx<'de> {
    /// A context for deserializing `text`, allowed to build `budget` weight units of values.
    pub(crate) fn new(text: &'de str, budget: usize) -> Self {
        Self {
            text,
            path: RefCell::new(Vec::new()),
            failure: RefCell::new(None),
            budget: Cell::new(budget),
        }
    }

    /// The text being read.
    pub(super) fn text(&self) -> &'de str {
        self.text
    }

    /// The recorded failure and the path where deserialization stopped.
    pub(crate) fn into_parts(self) -> (Option<Failure>, Vec<Seg>) {
        (self.failure.into_inner(), self.path.into_inner())
    }

    pub(super) fn push(&self, seg: Seg) {
        self.path.borrow_mut().push(seg);
    }

    pub(super) fn pop(&self) {
        self.path.borrow_mut().pop();
    }

    /// Records an error about the node at the current path and returns it for `serde_yaml`,
    /// which adds the node's position.
    pub(super) fn fail<E: de::Error>(&self, message: String) -> E {
        self.record(message, false)
    }

    fn record<E: de::Error>(&self, message: String, aliases: bool) -> E {
        let path = self.path.borrow().clone();
        let failure = Failure { path, message: message.clone(), aliases };
        *self.failure.borrow_mut() = Some(failure);
        E::custom(message)
    }

    /// Charges `weight` to the budget.
    pub(super) fn spend<E: de::Error>(&self, weight: usize) -> Result<(), E> {
        match self.budget.get().checked_sub(weight) {
            Some(left) => {
                self.budget.set(left);
                Ok(())
            }
            None => Err(self.record(
                "the file expands to too much data (YAML aliases repeat values); write the \
                 values out or split the file"
                    .into(),
                true,
            )),
        }
    }

    /// Byte offset of `part` in the text, when it was borrowed from it.
    pub(super) fn offset(&self, part: &str) -> Option<usize> {
        let start = self.text.as_ptr().addr();
        let at = part.as_ptr().addr().checked_sub(start)?;
        (at + part.len() <= self.text.len()).then_some(at)
    }

    /// Whether a string borrowed from the text was written without quotes: a quoted scalar
    /// is lent without its opening quote, which therefore precedes it.
    pub(super) fn is_plain(&self, part: &str) -> bool {
        match self.offset(part) {
            Some(0) => true,
            Some(at) => !matches!(self.text.as_bytes()[at - 1], b'"' | b'\''),
            None => false,
        }
    }
}
