//! Test-only fault injection (feature `fault-injection`, which only the
//! test build enables): a prompt starting with a chosen token id makes the
//! engine panic, inside a step or outside it. The hooks prove that a step's
//! panic ends only that step's sequences and that a dead engine ends the
//! server. Set by `EngineConfig::faults`, or for a server by the hidden
//! flags `--fault-step-panic-token` / `--fault-engine-panic-token`.

#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// A step that runs a prompt starting with this id panics.
    pub step_panic_token: Option<u32>,
    /// Admitting a prompt starting with this id panics the engine loop itself.
    pub engine_panic_token: Option<u32>,
}
