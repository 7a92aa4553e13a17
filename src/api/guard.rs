//! Where requests may come from. A request's `Host` must be one the server
//! answers to (`--allowed-hosts`): a web page whose name is rebound to
//! 127.0.0.1 can otherwise reach a local server. And a browser request that
//! changes state must come from the server's own origin or one listed in
//! `--allowed-origins`: a page can post a form (multipart, urlencoded or
//! plain text) anywhere without asking first, so CORS alone does not stop it.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

#[derive(Debug, Clone, Default)]
pub struct Guard {
    /// Lower-case names: `*` any, `.example.com` the domain and its sub-domains.
    pub hosts: Vec<String>,
    /// Origins as browsers send them (`*` any).
    pub origins: Vec<String>,
}

impl Guard {
    fn host_allowed(&self, host: &str) -> bool {
        let name = host_name(host);
        self.hosts.iter().any(|allowed| match allowed.strip_prefix('.') {
            _ if allowed == "*" => true,
            Some(domain) => name == domain || name.ends_with(allowed.as_str()),
            None => name == *allowed,
        })
    }

    fn origin_allowed(&self, origin: &str, host: &str) -> bool {
        let same = origin.split_once("://").is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(host));
        same || self.origins.iter().any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
    }
}

/// A `Host` value without its port, lower-case (`[::1]:8080` → `[::1]`).
fn host_name(host: &str) -> String {
    let host = host.trim().to_ascii_lowercase();
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => host[..=end].to_string(),
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name.to_string(),
        _ => host,
    }
}

fn refused(code: &'static str, message: String) -> Response {
    ApiError { status: StatusCode::FORBIDDEN, code: Some(code), ..ApiError::bad_request(message) }.into_response()
}

/// Probes (orchestrators' health checks, Prometheus) address a server by
/// whatever name or address they have; these routes reveal nothing.
const ANY_HOST: [&str; 2] = ["/health", "/metrics"];

pub async fn check(State(guard): State<Arc<Guard>>, request: Request, next: Next) -> Response {
    if ANY_HOST.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| request.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    if !guard.host_allowed(&host) {
        tracing::warn!(%host, "request for a host this server does not answer to");
        return refused(
            "host_not_allowed",
            format!("this server does not answer to the host `{host}` (--allowed-hosts)"),
        );
    }
    let changes = !matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if changes {
        if let Some(origin) = request.headers().get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
            if !guard.origin_allowed(origin, &host) {
                tracing::warn!(%origin, "cross-origin request refused");
                return refused(
                    "origin_not_allowed",
                    format!("requests from the origin `{origin}` are not allowed (--allowed-origins)"),
                );
            }
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_match_by_name_whatever_the_port() {
        let guard = Guard {
            hosts: vec!["localhost".into(), "127.0.0.1".into(), "[::1]".into(), ".example.com".into()],
            origins: vec![],
        };
        for ok in ["localhost:8080", "LOCALHOST", "127.0.0.1:9", "[::1]:8080", "example.com", "api.example.com:443"] {
            assert!(guard.host_allowed(ok), "{ok}");
        }
        for bad in ["rebind.attacker.example", "127.0.0.2", "evilexample.com", "", "localhost.attacker.example"] {
            assert!(!guard.host_allowed(bad), "{bad}");
        }
        assert!(Guard { hosts: vec!["*".into()], origins: vec![] }.host_allowed("anything:1"));
    }

    #[test]
    fn origins_are_the_server_itself_or_listed() {
        let guard = Guard { hosts: vec![], origins: vec!["https://app.example".into()] };
        assert!(guard.origin_allowed("http://127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(guard.origin_allowed("https://app.example", "127.0.0.1:8080"));
        assert!(!guard.origin_allowed("https://evil.example", "127.0.0.1:8080"));
        assert!(!guard.origin_allowed("null", "127.0.0.1:8080"));
        assert!(!guard.origin_allowed("http://127.0.0.1:8081", "127.0.0.1:8080"));
    }
}
