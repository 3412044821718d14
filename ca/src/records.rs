//! The CA's records as an [`Authority`] reads and writes them: from its [`crate::ledger::Store`]
//! when it has one (replicated `ca serve`), else from the CA directory (`inventory.jsonl`,
//! `ca.json`). Callers never branch on where the records live.

use time::OffsetDateTime;

use crate::authority::CaState;
use crate::inventory::{self, Entry, Record};
use crate::{Authority, CaError};

/// "Is this serial recorded?", from [`Authority::serial_checker`].
pub(crate) type SerialCheck<'a> = Box<dyn Fn(&str) -> Result<bool, CaError> + 'a>;

impl Authority {
    /// Every certificate with its state at `now`, from the store or `inventory.jsonl`.
    pub(crate) fn entries(&self, now: OffsetDateTime) -> Result<Vec<Entry>, CaError> {
        match self.store() {
            Some(s) => Ok(inventory::entries_from(s.records()?, now)),
            None => inventory::read_entries(self.dir(), now),
        }
    }

    /// Appends an inventory record (the caller holds the directory lock).
    pub(crate) fn append_record(&self, record: &Record) -> Result<(), CaError> {
        match self.store() {
            Some(s) => s.append(record),
            None => inventory::append(self.dir(), record),
        }
    }

    /// A predicate "this serial is already recorded" (a store error stops the search).
    pub(crate) fn serial_checker(&self) -> Result<SerialCheck<'_>, CaError> {
        match self.store() {
            Some(s) => Ok(Box::new(move |serial| s.serial_known(serial))),
            None => {
                let known = inventory::known_serials(self.dir())?;
                Ok(Box::new(move |serial| Ok(known.contains(serial))))
            }
        }
    }

    /// The next CRL number: from the store's sequence (monotonic across replicas) or `ca.json`.
    /// `state.crl_number` is set to it either way (the caller saves `state`).
    pub(crate) fn next_crl_number(&self, state: &mut CaState) -> Result<u64, CaError> {
        state.crl_number = match self.store() {
            Some(s) => s.next_crl_number()?,
            None => state.crl_number + 1,
        };
        Ok(state.crl_number)
    }
}
