//! The one generation path: submit prompts to the engine, then either stream
//! the events as SSE or collect the same events into one response.

use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::error::ApiError;
use super::params::Validated;
use super::types::UsageBody;
use super::{AppState, Target};
use crate::engine::{Event, FinishReason, GenerationRequest};

/// One submitted prompt: its choice index and its event receiver. Dropping
/// it (client gone) cancels the sequence in the engine.
pub struct Submitted {
    pub index: usize,
    events: mpsc::UnboundedReceiver<Event>,
}

/// Queues every prompt; if one is refused, the ones already queued are
/// dropped with it and so cancelled.
pub fn submit_all(
    state: &AppState,
    target: &Target,
    prompts: Vec<(Vec<u32>, usize)>,
    params: &Validated,
) -> Result<Vec<Submitted>, ApiError> {
    let mut submitted = Vec::with_capacity(prompts.len());
    for (index, (prompt, max_tokens)) in prompts.into_iter().enumerate() {
        let (tx, rx) = mpsc::unbounded_channel();
        state.engine.submit(GenerationRequest {
            prompt,
            adapter: target.adapter.clone(),
            sampling: params.sampling.clone(),
            max_tokens,
            stop: params.stop.clone(),
            ignore_eos: params.ignore_eos,
            events: tx,
            span: tracing::Span::current(),
        })?;
        submitted.push(Submitted { index, events: rx });
    }
    Ok(submitted)
}

/// What a streaming endpoint turns into one SSE `data:` line.
pub enum Piece {
    /// Before any text of choice `index` (chat sends the role here).
    Start(usize),
    Text(usize, String),
    Finish(usize, FinishReason),
    /// The usage chunk, after every choice finished (`include_usage`).
    Usage(UsageBody),
}

fn merged(subs: Vec<Submitted>) -> impl Stream<Item = (usize, Event)> {
    futures::stream::select_all(subs.into_iter().map(|s| {
        let index = s.index;
        UnboundedReceiverStream::new(s.events).map(move |e| (index, e))
    }))
}

fn engine_failure(message: String) -> ApiError {
    tracing::error!(%message, "generation failed");
    ApiError::internal(message)
}

/// Streams the events as SSE: `render` shapes each piece (None skips it),
/// then `data: [DONE]`. After an error, one error event ends the stream.
pub fn sse<F>(
    subs: Vec<Submitted>,
    include_usage: bool,
    render: F,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>>
where
    F: Fn(Piece) -> Option<String> + Send + 'static,
{
    let choices = subs.len();
    let mut events = merged(subs);
    let stream = async_stream::stream! {
        for index in 0..choices {
            if let Some(data) = render(Piece::Start(index)) {
                yield Ok(SseEvent::default().data(data));
            }
        }
        let mut usage = UsageBody::default();
        let mut finished = 0;
        while let Some((index, event)) = events.next().await {
            match event {
                Event::Text(text) => {
                    if let Some(data) = render(Piece::Text(index, text)) {
                        yield Ok(SseEvent::default().data(data));
                    }
                }
                Event::Finished { reason, usage: u } => {
                    usage += u.into();
                    finished += 1;
                    if let Some(data) = render(Piece::Finish(index, reason)) {
                        yield Ok(SseEvent::default().data(data));
                    }
                }
                Event::Failed(message) => {
                    yield Ok(SseEvent::default().data(engine_failure(message).to_json()));
                    return;
                }
            }
        }
        if finished < choices {
            let error = engine_failure("the engine stopped before the generation finished".into());
            yield Ok(SseEvent::default().data(error.to_json()));
            return;
        }
        if include_usage {
            if let Some(data) = render(Piece::Usage(usage)) {
                yield Ok(SseEvent::default().data(data));
            }
        }
        yield Ok(SseEvent::default().data("[DONE]"));
    };
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// Every choice's full text and finish reason, and the summed usage.
pub struct Collected {
    pub choices: Vec<(String, FinishReason)>,
    pub usage: UsageBody,
}

pub async fn collect(subs: Vec<Submitted>) -> Result<Collected, ApiError> {
    let n = subs.len();
    let mut texts = vec![String::new(); n];
    let mut reasons: Vec<Option<FinishReason>> = vec![None; n];
    let mut usage = UsageBody::default();
    let mut events = merged(subs);
    while let Some((index, event)) = events.next().await {
        match event {
            Event::Text(text) => texts[index].push_str(&text),
            Event::Finished { reason, usage: u } => {
                reasons[index] = Some(reason);
                usage += u.into();
            }
            Event::Failed(message) => return Err(engine_failure(message)),
        }
    }
    let choices = texts
        .into_iter()
        .zip(reasons)
        .map(|(text, reason)| {
            reason
                .map(|r| (text, r))
                .ok_or_else(|| engine_failure("the engine stopped before the generation finished".into()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Collected { choices, usage })
}
