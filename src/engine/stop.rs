//! Stop strings, matched on decoded text across token boundaries: text that
//! may still become a stop string is held back, and the output ends exactly
//! before the first stop string.

#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Decoded text not yet released because it may begin a stop string.
    held: String,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Released {
    pub text: String,
    /// The stop string found, if one was; nothing after it may be emitted.
    pub stop: Option<String>,
}

impl Released {
    pub fn stopped(&self) -> bool {
        self.stop.is_some()
    }
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), held: String::new() }
    }

    /// Adds newly decoded text; returns what can safely be shown.
    pub fn push(&mut self, text: &str) -> Released {
        self.held.push_str(text);
        let first_stop = self.stops.iter().filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s))).min();
        if let Some((at, stop)) = first_stop {
            let text = self.held[..at].to_string();
            self.held.clear();
            return Released { text, stop: Some(stop.clone()) };
        }
        let keep = self.longest_partial_suffix();
        let text = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        Released { text, stop: None }
    }

    /// The generation ended for another reason: release what was held.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Bytes at the end of `held` that are a proper prefix of some stop string.
    fn longest_partial_suffix(&self) -> usize {
        let mut best = 0;
        for stop in &self.stops {
            for (i, _) in self.held.char_indices() {
                let suffix = &self.held[i..];
                if suffix.len() <= best {
                    break;
                }
                if suffix.len() < stop.len() && stop.starts_with(suffix) {
                    best = suffix.len();
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let r = m.push(p);
            out.push_str(&r.text);
            if r.stopped() {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn stop_split_across_pieces_is_cut_exactly() {
        assert_eq!(run(&["END"], &["Hello E", "N", "D and more"]), ("Hello ".into(), true));
        assert_eq!(run(&["\n\n"], &["a\n", "\nb"]), ("a".into(), true));
    }

    #[test]
    fn held_text_is_released_when_it_cannot_match() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("abc E").text, "abc ");
        assert_eq!(m.push("X").text, "EX");
        assert_eq!(run(&["END"], &["tail E"]), ("tail E".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins_and_multibyte_is_safe() {
        assert_eq!(run(&["world", "lo"], &["hello world"]), ("hel".into(), true));
        assert_eq!(run(&["日本"], &["これは日", "本です"]), ("これは".into(), true));
        assert_eq!(run(&["é!"], &["caféé"]), ("caféé".into(), false));
    }

    #[test]
    fn the_stop_that_matched_is_named() {
        let mut m = StopMatcher::new(vec!["world".into(), "lo".into()]);
        assert_eq!(m.push("hello world"), Released { text: "hel".into(), stop: Some("lo".into()) });
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("no stop here"), Released { text: "no stop here".into(), stop: None });
    }
}
