//! One way to save and restore the state of everything a snapshot holds (each device, the vCPUs,
//! the VM): [`Persist`] on the object, [`Versioned`] on its state, and [`SavedState`], the named,
//! versioned entry a snapshot keeps in its list.
//!
//! A restore writes a saved state into a freshly built object (built from the machine's
//! configuration with its host resources: file descriptors, interrupt lines, the console), so the
//! state holds only what the guest can see and change. Each state names its kind and the version
//! of its layout; an entry of another kind or version is refused with a typed error, never
//! decoded as something else.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A state a snapshot stores: its kind name and the version of its layout.
pub trait Versioned: Serialize + DeserializeOwned {
    /// Kind name stored with the state (`"serial"`, `"virtio-mmio"`, `"vcpu"`, ...).
    const KIND: &'static str;
    /// Version of this type's layout. Bump it when the layout changes in a way an older reader
    /// would misread; a restore refuses any version it does not know.
    const VERSION: u32;
}

/// Something whose state a snapshot saves and a restore writes back into a freshly built one.
pub trait Persist {
    /// The saved state.
    type State: Versioned;
    /// Why a save or a restore failed.
    type Error: std::error::Error + Send + Sync + 'static;
    /// The current state. The caller keeps the object quiet meanwhile (vCPUs paused, device
    /// workers held off their queues).
    fn save(&self) -> Result<Self::State, Self::Error>;
    /// Puts `state` into this freshly built object.
    fn restore(&mut self, state: &Self::State) -> Result<(), Self::Error>;
}

/// Errors of encoding, decoding and restoring [`SavedState`]s.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The entry holds another kind of state than the one asked for.
    #[error("state {name:?} is a {found:?} state, expected {expected:?}")]
    Kind {
        /// Entry name.
        name: String,
        /// Kind asked for.
        expected: &'static str,
        /// Kind stored.
        found: String,
    },
    /// The entry's layout version is not the one this build reads.
    #[error("state {name:?} ({kind}) has layout version {found}; this build reads {supported}")]
    Version {
        /// Entry name.
        name: String,
        /// Its kind.
        kind: &'static str,
        /// Version stored.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// The state could not be encoded or does not decode.
    #[error("state {name:?} ({kind}) does not {op}")]
    Codec {
        /// Entry name.
        name: String,
        /// Its kind.
        kind: &'static str,
        /// "encode" or "decode".
        op: &'static str,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// The object refused to save or take the state.
    #[error("state {name:?} ({kind}) could not be {op}")]
    Object {
        /// Entry name.
        name: String,
        /// Its kind.
        kind: &'static str,
        /// "saved" or "restored".
        op: &'static str,
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A state the machine needs is not in the list.
    #[error("the snapshot has no state {0:?}")]
    Missing(String),
    /// Two entries have the same name.
    #[error("the snapshot has two states named {0:?}")]
    Duplicate(String),
}

/// One named, versioned state in a snapshot's list.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct SavedState {
    /// Unique name in the machine (`"serial"`, `"virtio-mmio/0"`, `"vcpu/1"`, ...).
    pub name: String,
    /// What it is a state of ([`Versioned::KIND`]).
    pub kind: String,
    /// Layout version ([`Versioned::VERSION`]).
    pub version: u32,
    /// The state.
    pub state: serde_json::Value,
}

impl SavedState {
    /// The entry `name` for `state`.
    pub fn encode<S: Versioned>(name: impl Into<String>, state: &S) -> Result<Self, PersistError> {
        let name = name.into();
        let value = serde_json::to_value(state).map_err(|source| PersistError::Codec {
            name: name.clone(),
            kind: S::KIND,
            op: "encode",
            source,
        })?;
        Ok(Self {
            name,
            kind: S::KIND.to_owned(),
            version: S::VERSION,
            state: value,
        })
    }

    /// Saves `obj` as the entry `name`.
    pub fn save<P: Persist>(name: impl Into<String>, obj: &P) -> Result<Self, PersistError> {
        let name = name.into();
        let state = obj.save().map_err(|e| PersistError::Object {
            name: name.clone(),
            kind: P::State::KIND,
            op: "saved",
            source: Box::new(e),
        })?;
        Self::encode(name, &state)
    }

    /// The state, if this entry is of kind `S` in the version this build reads.
    pub fn decode<S: Versioned>(&self) -> Result<S, PersistError> {
        if self.kind != S::KIND {
            return Err(PersistError::Kind {
                name: self.name.clone(),
                expected: S::KIND,
                found: self.kind.clone(),
            });
        }
        if self.version != S::VERSION {
            return Err(PersistError::Version {
                name: self.name.clone(),
                kind: S::KIND,
                found: self.version,
                supported: S::VERSION,
            });
        }
        S::deserialize(&self.state).map_err(|source| PersistError::Codec {
            name: self.name.clone(),
            kind: S::KIND,
            op: "decode",
            source,
        })
    }

    /// Decodes this entry and writes it into `obj`.
    pub fn restore_into<P: Persist>(&self, obj: &mut P) -> Result<(), PersistError> {
        let state = self.decode::<P::State>()?;
        obj.restore(&state).map_err(|e| PersistError::Object {
            name: self.name.clone(),
            kind: P::State::KIND,
            op: "restored",
            source: Box::new(e),
        })
    }
}

/// Looks entries up by name in a snapshot's list.
pub trait StateList {
    /// The entry called `name`, if any.
    fn entry(&self, name: &str) -> Option<&SavedState>;
    /// The state called `name` decoded as `S`; `None` when there is no such entry.
    fn state_of<S: Versioned>(&self, name: &str) -> Result<Option<S>, PersistError> {
        self.entry(name).map(SavedState::decode).transpose()
    }
    /// Checks that no two entries share a name.
    fn check_names(&self) -> Result<(), PersistError>;
}

impl StateList for [SavedState] {
    fn entry(&self, name: &str) -> Option<&SavedState> {
        self.iter().find(|s| s.name == name)
    }

    fn check_names(&self) -> Result<(), PersistError> {
        let mut seen = std::collections::BTreeSet::new();
        match self.iter().find(|s| !seen.insert(s.name.as_str())) {
            Some(dup) => Err(PersistError::Duplicate(dup.name.clone())),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, serde::Deserialize)]
    struct Counter {
        n: u32,
    }

    impl Versioned for Counter {
        const KIND: &'static str = "counter";
        const VERSION: u32 = 2;
    }

    #[derive(Debug, Serialize, serde::Deserialize)]
    struct Other;

    impl Versioned for Other {
        const KIND: &'static str = "other";
        const VERSION: u32 = 1;
    }

    #[derive(Default)]
    struct Dev {
        n: u32,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("too big")]
    struct TooBig;

    impl Persist for Dev {
        type State = Counter;
        type Error = TooBig;
        fn save(&self) -> Result<Counter, TooBig> {
            Ok(Counter { n: self.n })
        }
        fn restore(&mut self, s: &Counter) -> Result<(), TooBig> {
            if s.n > 100 {
                return Err(TooBig);
            }
            self.n = s.n;
            Ok(())
        }
    }

    #[test]
    fn states_round_trip_and_wrong_kinds_versions_and_values_are_refused() {
        let e = SavedState::save("dev/0", &Dev { n: 7 }).unwrap();
        assert_eq!((e.kind.as_str(), e.version), ("counter", 2));
        let mut d = Dev::default();
        e.restore_into(&mut d).unwrap();
        assert_eq!(d.n, 7);

        let err = e.decode::<Other>().unwrap_err();
        assert!(matches!(err, PersistError::Kind { .. }), "{err}");
        let mut old = e.clone();
        old.version = 1;
        let err = old.decode::<Counter>().unwrap_err();
        assert!(
            matches!(
                err,
                PersistError::Version {
                    found: 1,
                    supported: 2,
                    ..
                }
            ),
            "{err}"
        );
        let mut garbled = e.clone();
        garbled.state = serde_json::json!({"n": "seven"});
        let err = garbled.decode::<Counter>().unwrap_err();
        assert!(matches!(err, PersistError::Codec { .. }), "{err}");
        let big = SavedState::encode("dev/0", &Counter { n: 1000 }).unwrap();
        let err = big.restore_into(&mut d).unwrap_err();
        assert!(matches!(err, PersistError::Object { .. }), "{err}");
        assert_eq!(d.n, 7, "a refused state changes nothing");

        let list = [e.clone(), SavedState::encode("x", &Other).unwrap()];
        assert_eq!(
            list.state_of::<Counter>("dev/0").unwrap(),
            Some(Counter { n: 7 })
        );
        assert!(list.state_of::<Counter>("nope").unwrap().is_none());
        assert!(list.state_of::<Counter>("x").is_err());
        list.check_names().unwrap();
        let dup = [e.clone(), e];
        assert!(matches!(dup.check_names(), Err(PersistError::Duplicate(_))));
    }
}
