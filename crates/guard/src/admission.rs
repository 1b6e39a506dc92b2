//! Admission: admit, degrade or refuse a run, and reserve its bytes while it runs.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::bytesize::ByteSize;

/// A candidate plan the caller could run instead, cheapest last or in any order: the
/// guard names the first one that fits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanOption {
    /// A name the caller understands (`smollm2-int4`, `max_tokens=256`).
    pub name: String,
    /// Its predicted peak bytes.
    pub predicted_bytes: u64,
}

/// The guard's answer.
#[derive(Debug)]
pub enum Admission {
    /// Run it; the bytes stay reserved until the [`Reservation`] is dropped.
    Admit(Reservation),
    /// The plan does not fit, but a cheaper one does: try it (and ask again).
    Degrade {
        /// The index into the alternatives given.
        index: usize,
        /// The cheaper plan.
        plan: PlanOption,
        /// Why the original plan was not admitted.
        reason: Refusal,
    },
    /// Nothing fits.
    Refuse(Refusal),
}

/// Why a plan was not admitted, with the numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The plan's predicted bytes.
    pub needed: u64,
    /// Memory in use outside reservations (for example loaded weights), in bytes.
    pub in_use: u64,
    /// Bytes reserved by runs in flight.
    pub reserved: u64,
    /// The cutline.
    pub cutline: u64,
}

impl Refusal {
    /// Bytes left under the cutline.
    pub fn available(&self) -> u64 {
        self.cutline.saturating_sub(self.in_use + self.reserved)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "needs {} but only {} is left under the cutline of {} ({} in use, {} reserved by runs in flight)",
            ByteSize(self.needed),
            ByteSize(self.available()),
            ByteSize(self.cutline),
            ByteSize(self.in_use),
            ByteSize(self.reserved)
        )
    }
}

#[derive(Debug)]
struct Ledger {
    reserved: u64,
    runs: u64,
}

/// Admits runs against a cutline, so that concurrent runs cannot together pass it.
///
/// Cloning a guard shares its ledger.
#[derive(Debug, Clone)]
pub struct Guard {
    cutline: u64,
    ledger: Arc<Mutex<Ledger>>,
}

fn lock(m: &Mutex<Ledger>) -> MutexGuard<'_, Ledger> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Guard {
    /// A guard for `cutline` bytes.
    pub fn new(cutline: u64) -> Self {
        Self {
            cutline,
            ledger: Arc::new(Mutex::new(Ledger {
                reserved: 0,
                runs: 0,
            })),
        }
    }

    /// The cutline.
    pub fn cutline(&self) -> u64 {
        self.cutline
    }

    /// Bytes reserved by runs in flight.
    pub fn reserved(&self) -> u64 {
        lock(&self.ledger).reserved
    }

    /// Runs in flight.
    pub fn runs(&self) -> u64 {
        lock(&self.ledger).runs
    }

    /// Decides on a run predicted to need `predicted` bytes while `in_use` bytes are
    /// used outside reservations. Admits when `in_use + reserved + predicted <=
    /// cutline`, reserving `predicted` atomically with the check; otherwise names the
    /// first of `alternatives` that would fit (`Degrade`), or refuses.
    pub fn admit(&self, predicted: u64, in_use: u64, alternatives: &[PlanOption]) -> Admission {
        let mut ledger = lock(&self.ledger);
        let fits = |bytes: u64| {
            in_use
                .checked_add(ledger.reserved)
                .and_then(|x| x.checked_add(bytes))
                .is_some_and(|total| total <= self.cutline)
        };
        if fits(predicted) {
            ledger.reserved += predicted;
            ledger.runs += 1;
            return Admission::Admit(Reservation {
                bytes: predicted,
                ledger: Arc::clone(&self.ledger),
            });
        }
        let refusal = Refusal {
            needed: predicted,
            in_use,
            reserved: ledger.reserved,
            cutline: self.cutline,
        };
        match alternatives
            .iter()
            .enumerate()
            .find(|(_, p)| fits(p.predicted_bytes))
        {
            Some((index, plan)) => Admission::Degrade {
                index,
                plan: plan.clone(),
                reason: refusal,
            },
            None => Admission::Refuse(refusal),
        }
    }
}

/// Bytes held for one admitted run; released when dropped (also during a panic).
#[derive(Debug)]
pub struct Reservation {
    bytes: u64,
    ledger: Arc<Mutex<Ledger>>,
}

impl Reservation {
    /// The bytes reserved.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut ledger = lock(&self.ledger);
        ledger.reserved = ledger.reserved.saturating_sub(self.bytes);
        ledger.runs = ledger.runs.saturating_sub(1);
    }
}
