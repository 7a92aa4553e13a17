//! tailor's adapter counters read from a server's `/metrics` before and
//! after a run (other servers have none: the summary says so with None).

use serde::Serialize;

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct AdapterActivity {
    pub adapter_loads: f64,
    pub adapter_evictions: f64,
    pub adapter_resolve_misses: f64,
    /// Bytes of adapter weights in memory at the end (a gauge, not a difference).
    pub adapter_bytes_resident: f64,
}

impl AdapterActivity {
    /// The counters' growth from `before` to `self`.
    pub fn since(&self, before: &Self) -> Self {
        Self {
            adapter_loads: self.adapter_loads - before.adapter_loads,
            adapter_evictions: self.adapter_evictions - before.adapter_evictions,
            adapter_resolve_misses: self.adapter_resolve_misses - before.adapter_resolve_misses,
            adapter_bytes_resident: self.adapter_bytes_resident,
        }
    }
}

pub async fn read(client: &reqwest::Client, url: &str) -> Option<AdapterActivity> {
    let response = client.get(format!("{}/metrics", url.trim_end_matches('/'))).send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    parse(&response.text().await.ok()?)
}

/// Sums each family's samples over their labels.
fn parse(text: &str) -> Option<AdapterActivity> {
    let sum = |name: &str| -> Option<f64> {
        let values: Vec<f64> = text
            .lines()
            .filter(|line| line.strip_prefix(name).is_some_and(|rest| rest.starts_with(['{', ' '])))
            .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    };
    Some(AdapterActivity {
        adapter_loads: sum("tailor_adapter_loads_total")?,
        adapter_evictions: sum("tailor_adapter_evictions_total").unwrap_or(0.0),
        adapter_resolve_misses: sum("tailor_adapter_resolve_misses_total").unwrap_or(0.0),
        adapter_bytes_resident: sum("tailor_adapter_bytes_resident").unwrap_or(0.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_summed_over_labels_and_absent_ones_are_none() {
        let text = "# TYPE tailor_adapter_loads_total counter\n\
                    tailor_adapter_loads_total{model_name=\"m\"} 7\n\
                    tailor_adapter_loads_total_extra 100\n\
                    tailor_adapter_evictions_total{model_name=\"m\"} 2\n\
                    tailor_adapter_bytes_resident{model_name=\"m\"} 1e6\n";
        let read = parse(text).expect("tailor's metrics");
        assert_eq!((read.adapter_loads, read.adapter_evictions, read.adapter_bytes_resident), (7.0, 2.0, 1e6));
        assert_eq!(parse("vllm:num_requests_running 0\n"), None);
        let later = AdapterActivity { adapter_loads: 10.0, ..read };
        assert_eq!(later.since(&read).adapter_loads, 3.0);
    }
}
