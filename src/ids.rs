//! Ids and the clock, for every module that names or dates what it makes
//! (responses, files, jobs, adapters). A leaf: it imports nothing of tailor.

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A fresh id with OpenAI's older prefixes (`cmpl-`, `chatcmpl-`, `file-`, `ftjob-`).
pub fn response_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// A fresh id in the newer APIs' style (`resp_`, `msg_`, `fc_`).
pub fn object_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// Whether `id` has the shape `response_id(prefix)` gives, so it is a plain
/// file name and never a path.
pub fn is_response_id(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|hex| !hex.is_empty() && hex.len() <= 64 && hex.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Whether `name` may name a model (an adapter, a preset): 1 to 128
/// letters, digits, `.`, `_`, `-`, `:`, not starting with `.`, `-` or `:`,
/// and no `..` (so it is never a path).
pub fn is_model_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(['.', '-', ':'])
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'))
        && !name.contains("..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_have_their_shape_and_hostile_ones_do_not() {
        let id = response_id("file");
        assert!(is_response_id(&id, "file"), "{id}");
        assert!(!is_response_id(&id, "ftjob"));
        for hostile in ["../file-00", "file-../../etc/passwd", "file-", "file", "file-00/..", "x"] {
            assert!(!is_response_id(hostile, "file"), "{hostile}");
        }
        assert!(object_id("msg").starts_with("msg_"));
    }
}
