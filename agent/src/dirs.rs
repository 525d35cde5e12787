//! The agent's directories are private: checked (and created or tightened)
//! at start, before anything is written. See
//! [`vigil_bundle::private::secure_dir`] for what is refused.

use anyhow::Context as _;

use crate::config::AgentConfig;

/// Checks the directories `cfg` writes to: the capture directory and its
/// `work`, `bundles` and `state` (when capturing), the spool (when
/// shipping). An error names the option, the path and what is wrong; the
/// agent exits 2 on it. Skipped when not root (the agent refuses to run
/// then anyway, with its own message).
pub fn secure_dirs(cfg: &AgentConfig) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    if cfg.captures() {
        vigil_bundle::private::secure_dir(&cfg.capture.dir).context("[capture] dir")?;
        // As `CaptureConfig::under` lays it out.
        for sub in ["work", "bundles", "state"] {
            let d = cfg.capture.dir.join(sub);
            vigil_bundle::private::secure_dir(&d)
                .with_context(|| format!("[capture] dir ({sub})"))?;
        }
    }
    if cfg.ship.collector.is_some() {
        vigil_bundle::private::secure_dir(&cfg.ship.spool_dir).context("[ship] spool_dir")?;
    }
    Ok(())
}
