//! Prometheus text exposition: the engine's gauges and counters (read from its snapshot) and
//! the latency histograms the server measures from each request's events.

use std::fmt::Write;
use std::sync::Mutex;

/// Bucket bounds in seconds, from a fast token on a small model to a long request.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

#[derive(Debug, Default)]
struct HistogramState {
    /// Count per bucket (not cumulative); the last entry is +Inf.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

#[derive(Debug)]
pub struct Histogram {
    name: &'static str,
    help: &'static str,
    state: Mutex<HistogramState>,
}

impl Histogram {
    pub fn new(name: &'static str, help: &'static str) -> Self {
        Histogram {
            name,
            help,
            state: Mutex::new(HistogramState {
                counts: vec![0; BUCKETS.len() + 1],
                sum: 0.0,
                count: 0,
            }),
        }
    }

    pub fn observe(&self, seconds: f64) {
        let i = BUCKETS
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(BUCKETS.len());
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.counts[i] += 1;
        s.sum += seconds;
        s.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).count
    }

    fn render(&self, out: &mut String) {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} histogram", self.name);
        let mut cum = 0;
        for (b, c) in BUCKETS.iter().zip(&s.counts) {
            cum += c;
            let _ = writeln!(out, "{}_bucket{{le=\"{b}\"}} {cum}", self.name);
        }
        cum += s.counts[BUCKETS.len()];
        let _ = writeln!(out, "{}_bucket{{le=\"+Inf\"}} {cum}", self.name);
        let _ = writeln!(out, "{}_sum {}", self.name, s.sum);
        let _ = writeln!(out, "{}_count {}", self.name, s.count);
    }
}

/// Latencies measured by the server.
#[derive(Debug)]
pub struct ServerMetrics {
    pub ttft: Histogram,
    pub inter_token: Histogram,
    pub duration: Histogram,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        ServerMetrics {
            ttft: Histogram::new(
                "zaya_time_to_first_token_seconds",
                "Time from request arrival to its first generated token.",
            ),
            inter_token: Histogram::new(
                "zaya_inter_token_latency_seconds",
                "Time between consecutive tokens of one choice.",
            ),
            duration: Histogram::new(
                "zaya_request_duration_seconds",
                "Time from request arrival to its last event.",
            ),
        }
    }
}

/// Engine-side numbers for the exposition (a snapshot).
#[derive(Debug, Clone, Default)]
pub struct EngineNumbers {
    pub running: usize,
    pub waiting: usize,
    pub prompt_tokens_total: u64,
    pub generation_tokens_total: u64,
    pub prefix_cache_hit_tokens_total: u64,
    pub requests_total: u64,
}

impl ServerMetrics {
    pub fn render(&self, e: &EngineNumbers) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        };
        metric(
            "zaya_requests_running",
            "gauge",
            "Requests with rows in the running batch.",
            e.running.to_string(),
        );
        metric(
            "zaya_requests_waiting",
            "gauge",
            "Requests queued for admission.",
            e.waiting.to_string(),
        );
        metric(
            "zaya_prompt_tokens_total",
            "counter",
            "Prompt tokens of admitted requests.",
            e.prompt_tokens_total.to_string(),
        );
        metric(
            "zaya_generation_tokens_total",
            "counter",
            "Generated tokens.",
            e.generation_tokens_total.to_string(),
        );
        metric(
            "zaya_prefix_cache_hit_tokens_total",
            "counter",
            "Prompt tokens served from the prefix cache.",
            e.prefix_cache_hit_tokens_total.to_string(),
        );
        metric(
            "zaya_requests_total",
            "counter",
            "Requests submitted to the engine.",
            e.requests_total.to_string(),
        );
        self.ttft.render(&mut out);
        self.inter_token.render(&mut out);
        self.duration.render(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = ServerMetrics::default();
        m.ttft.observe(0.003);
        m.ttft.observe(0.2);
        m.ttft.observe(500.0);
        let text = m.render(&EngineNumbers {
            running: 2,
            ..Default::default()
        });
        assert!(text.contains("zaya_requests_running 2\n"));
        assert!(text.contains("zaya_time_to_first_token_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("zaya_time_to_first_token_seconds_bucket{le=\"0.25\"} 2\n"));
        assert!(text.contains("zaya_time_to_first_token_seconds_bucket{le=\"120\"} 2\n"));
        assert!(text.contains("zaya_time_to_first_token_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("zaya_time_to_first_token_seconds_count 3\n"));
        assert!(text.contains("# TYPE zaya_inter_token_latency_seconds histogram"));
    }
}
