//! The one generation path: submit prompts to the engine, then either stream
//! the events as SSE or collect the same events into one response.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::{Stream, StreamExt};

use super::error::ApiError;
use super::lifecycle::Lifecycle;
use super::observe::Facts;
use super::params::Validated;
use super::stall::Watched;
use super::types::UsageBody;
use super::{AppState, Target};
use crate::engine::{Event, EventStream, FinishReason, GenerationRequest, RequestTags, TokenLogprob};
use crate::grammar::Constraint;

/// One submitted prompt: its choice index and its events. Dropping it
/// (client gone) cancels the sequence in the engine.
pub struct Submitted {
    pub index: usize,
    /// The first choice of its prompt: usage counts a prompt once, however many choices it has.
    counts_prompt: bool,
    events: EventStream,
}

/// Queues every prompt, all or none (a request with more prompts than may
/// wait is a 400; a full line a 429).
pub fn submit_all(
    state: &AppState,
    target: &Target,
    prompts: Vec<(Vec<u32>, usize)>,
    params: &Validated,
    mut constraints: Vec<Constraint>,
) -> Result<Vec<Submitted>, ApiError> {
    // `n` choices per prompt, prompt-major (choice index = prompt × n + j);
    // a seeded request gives each choice its own seed.
    let n = params.n;
    let mut requests = Vec::with_capacity(prompts.len() * n);
    for (prompt, max_tokens) in prompts {
        for j in 0..n {
            let mut sampling = params.sampling.clone();
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(j as u64));
            requests.push(GenerationRequest {
                prompt: prompt.clone(),
                adapter: target.adapter.clone(),
                sampling,
                max_tokens,
                stop: params.stop.clone(),
                ignore_eos: params.ignore_eos,
                skip_special_tokens: params.skip_special_tokens,
                prompt_logprobs: params.prompt_logprobs,
                tags: RequestTags { model: target.requested.clone(), adapters: target.adapter_names.clone() },
                constraint: constraints.pop(),
                span: tracing::Span::current(),
                cache_partition: params.cache_partition,
            });
        }
    }
    let streams = state.engine.submit_all(requests)?;
    Ok(streams
        .into_iter()
        .enumerate()
        .map(|(index, events)| Submitted { index, counts_prompt: index % n == 0, events })
        .collect())
}

/// One grammar state per sequence to be generated (`count` of them) for a
/// request's `response_format`, or none. Built on the blocking pool: the
/// first use builds the vocabulary's token trie, a schema compiles.
pub async fn constraints(
    state: &AppState,
    info: &std::sync::Arc<crate::loader::ModelInfo>,
    response_format: Option<&serde_json::Value>,
    count: usize,
) -> Result<Vec<Constraint>, ApiError> {
    let invalid = |e: String| ApiError::invalid("response_format", e);
    let Some(grammar) = response_format
        .map(crate::grammar::from_response_format)
        .transpose()
        .map_err(|e| invalid(e.to_string()))?
        .flatten()
    else {
        return Ok(Vec::new());
    };
    let info = info.clone();
    state
        .blocking(move || {
            let grammars = info.grammars().map_err(ApiError::bad_request)?;
            let first = grammars.matcher(&grammar).map_err(|e| invalid(format!("invalid response_format: {e}")))?;
            let mut all: Vec<Constraint> = (1..count).map(|_| Constraint::new(first.deep_clone())).collect();
            all.push(Constraint::new(first));
            Ok(all)
        })
        .await
}

/// Why a choice ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Ending {
    pub reason: FinishReason,
    /// The stop string that ended it, if one did.
    pub stop: Option<String>,
}

/// What a streaming endpoint turns into its events.
pub enum Piece {
    /// Before any text of choice `index` (chat sends the role here).
    Start(usize),
    /// The prompt's log-probabilities (requests that asked: `echo`), before its text.
    Prompt(usize, Vec<TokenLogprob>),
    /// Text, with the log-probabilities of the tokens since the last piece.
    Text(usize, String, Vec<TokenLogprob>),
    Finish(usize, Ending, Vec<TokenLogprob>),
    /// The usage chunk, after every choice finished (`include_usage`).
    Usage(UsageBody),
}

/// Where a generation's results go besides the client: the request's facts
/// (for its log line), the shutdown signal, the stalled-reader timeout.
pub struct Delivery {
    facts: Facts,
    lifecycle: Lifecycle,
    write_timeout: Duration,
}

impl Delivery {
    pub fn new(state: &AppState, facts: Facts) -> Self {
        Self { facts, lifecycle: state.lifecycle.clone(), write_timeout: state.stream_write_timeout }
    }
}

fn shutting_down() -> ApiError {
    ApiError {
        code: Some("shutting_down"),
        ..ApiError::unavailable("the server shut down before the generation finished")
    }
}

fn merged(subs: Vec<Submitted>) -> impl Stream<Item = (usize, Event)> {
    futures::stream::select_all(subs.into_iter().map(|s| {
        let (index, counts_prompt) = (s.index, s.counts_prompt);
        s.events.map(move |e| match e {
            Event::Finished { reason, stop, mut usage } if !counts_prompt => {
                usage.prompt_tokens = 0;
                usage.cached_tokens = 0;
                (index, Event::Finished { reason, stop, usage })
            }
            e => (index, e),
        })
    }))
}

fn engine_failure(message: String) -> ApiError {
    tracing::error!(%message, "generation failed");
    ApiError::internal(message)
}

/// How one API dialect writes a stream: its events for each item (a
/// generation's `Piece`, or a chat chunk made of them), for a failure (the
/// last thing sent), and at the end.
pub trait Wire<Item = Piece>: Send + 'static {
    fn piece(&mut self, item: Item) -> Vec<SseEvent>;
    fn failed(&mut self, error: &ApiError) -> Vec<SseEvent>;
    fn done(&mut self) -> Vec<SseEvent>;
}

/// OpenAI's streams: one `data:` line per chunk (`render` shapes it, None
/// skips it), then `data: [DONE]`; an error is one data line and `[DONE]`
/// (as vLLM ends it).
pub struct DataLines<F>(pub F);

impl<F: FnMut(Piece) -> Option<String> + Send + 'static> Wire<Piece> for DataLines<F> {
    fn piece(&mut self, piece: Piece) -> Vec<SseEvent> {
        (self.0)(piece).map(|data| SseEvent::default().data(data)).into_iter().collect()
    }

    fn failed(&mut self, error: &ApiError) -> Vec<SseEvent> {
        openai_failed(error)
    }

    fn done(&mut self) -> Vec<SseEvent> {
        openai_done()
    }
}

/// OpenAI's end of a failed stream: the error envelope, then `[DONE]`.
pub fn openai_failed(error: &ApiError) -> Vec<SseEvent> {
    vec![SseEvent::default().data(error.to_json()), SseEvent::default().data("[DONE]")]
}

/// OpenAI's end of a stream.
pub fn openai_done() -> Vec<SseEvent> {
    vec![SseEvent::default().data("[DONE]")]
}

/// An SSE response of events already made (a reply generated whole).
pub fn sse_of(events: Vec<SseEvent>) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    Sse::new(futures::stream::iter(events.into_iter().map(Ok)))
}

/// Streams the events as SSE in `wire`'s dialect.
pub fn sse(
    subs: Vec<Submitted>,
    delivery: Delivery,
    include_usage: bool,
    mut wire: impl Wire<Piece>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let choices = subs.len();
    let tickets: Vec<Arc<crate::engine::Ticket>> = subs.iter().map(|s| s.events.ticket()).collect();
    let mut events = merged(subs);
    let Delivery { facts, lifecycle, write_timeout } = delivery;
    let stream = async_stream::stream! {
        for index in 0..choices {
            for event in wire.piece(Piece::Start(index)) {
                yield Ok(event);
            }
        }
        let mut usage = UsageBody::default();
        let mut finished = 0;
        let mut pending: Vec<Vec<TokenLogprob>> = vec![Vec::new(); choices];
        let aborted = lifecycle.aborted();
        tokio::pin!(aborted);
        loop {
            let next = tokio::select! {
                biased;
                event = events.next() => Some(event),
                _ = &mut aborted => None,
            };
            let Some(next) = next else {
                let error = shutting_down();
                facts.failed(&error.message);
                for event in wire.failed(&error) {
                    yield Ok(event);
                }
                return;
            };
            let Some((index, event)) = next else { break };
            match event {
                Event::Logprob(lp) => pending[index].push(lp),
                Event::PromptLogprobs(entries) => {
                    for event in wire.piece(Piece::Prompt(index, entries)) {
                        yield Ok(event);
                    }
                }
                Event::Text(text) => {
                    facts.text_arrived();
                    for event in wire.piece(Piece::Text(index, text, std::mem::take(&mut pending[index]))) {
                        yield Ok(event);
                    }
                }
                Event::Finished { reason, stop, usage: u } => {
                    facts.finished(reason.as_str(), u.prompt_tokens, u.completion_tokens);
                    usage += u.into();
                    finished += 1;
                    let ending = Ending { reason, stop };
                    for event in wire.piece(Piece::Finish(index, ending, std::mem::take(&mut pending[index]))) {
                        yield Ok(event);
                    }
                }
                Event::Failed(message) => {
                    facts.failed(&message);
                    for event in wire.failed(&engine_failure(message)) {
                        yield Ok(event);
                    }
                    return;
                }
            }
        }
        if finished < choices {
            let error = engine_failure("the generation ended before it finished".into());
            facts.failed(&error.message);
            for event in wire.failed(&error) {
                yield Ok(event);
            }
            return;
        }
        if include_usage {
            for event in wire.piece(Piece::Usage(usage)) {
                yield Ok(event);
            }
        }
        for event in wire.done() {
            yield Ok(event);
        }
    };
    Sse::new(Watched::new(stream, tickets, write_timeout)).keep_alive(KeepAlive::default())
}

/// One choice of a finished request.
pub struct Choice {
    pub text: String,
    pub ending: Ending,
    /// Per generated token, when the request asked for log-probabilities.
    pub logprobs: Vec<TokenLogprob>,
    /// Per prompt token after the first, when the request asked (`echo`).
    pub prompt_logprobs: Vec<TokenLogprob>,
}

/// Every choice, and the summed usage.
pub struct Collected {
    pub choices: Vec<Choice>,
    pub usage: UsageBody,
}

pub async fn collect(subs: Vec<Submitted>, delivery: Delivery) -> Result<Collected, ApiError> {
    let n = subs.len();
    let mut texts = vec![String::new(); n];
    let mut endings: Vec<Option<Ending>> = vec![None; n];
    let mut logprobs: Vec<Vec<TokenLogprob>> = vec![Vec::new(); n];
    let mut prompt_logprobs: Vec<Vec<TokenLogprob>> = vec![Vec::new(); n];
    let mut usage = UsageBody::default();
    let mut events = merged(subs);
    let facts = &delivery.facts;
    let aborted = delivery.lifecycle.aborted();
    tokio::pin!(aborted);
    loop {
        let next = tokio::select! {
            biased;
            event = events.next() => event,
            _ = &mut aborted => return Err(shutting_down()),
        };
        let Some((index, event)) = next else { break };
        match event {
            Event::Logprob(lp) => logprobs[index].push(lp),
            Event::PromptLogprobs(entries) => prompt_logprobs[index] = entries,
            Event::Text(text) => {
                facts.text_arrived();
                texts[index].push_str(&text);
            }
            Event::Finished { reason, stop, usage: u } => {
                facts.finished(reason.as_str(), u.prompt_tokens, u.completion_tokens);
                endings[index] = Some(Ending { reason, stop });
                usage += u.into();
            }
            Event::Failed(message) => return Err(engine_failure(message)),
        }
    }
    let choices = texts
        .into_iter()
        .zip(endings)
        .zip(logprobs)
        .zip(prompt_logprobs)
        .map(|(((text, ending), logprobs), prompt_logprobs)| {
            ending
                .map(|ending| Choice { text, ending, logprobs, prompt_logprobs })
                .ok_or_else(|| engine_failure("the generation ended before it finished".into()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Collected { choices, usage })
}
