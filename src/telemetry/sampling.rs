//! Head sampling, decided before a request's span exists.
//!
//! The SDK samples when a span starts, but `tracing-opentelemetry` has by then built the span in
//! the registry, collected its attributes, and it keeps activating its context on every poll: an
//! unsampled request still cost about half the extra CPU of a traced one (measured in
//! loadtest/RESULTS.md). So the configured sampler (`OTEL_TRACES_SAMPLER`, the SDK's own
//! implementation) is asked here first, and an unsampled request gets its spans under the
//! [`UNTRACED`] target, which the export layer never listens to: with quiet logs those spans are
//! disabled outright and cost nothing. The SDK itself then samples always-on, since everything that
//! reaches it was already chosen.
//!
//! Database spans follow their request: they are traced only inside a traced request span (work
//! outside any request, like the idempotency-key sweeper, is not traced).

use std::sync::OnceLock;

use opentelemetry::{
    Context,
    trace::{SpanKind, TraceContextExt as _},
};
use opentelemetry_sdk::trace::{
    IdGenerator as _, RandomIdGenerator, Sampler, SamplingDecision, ShouldSample as _,
};
use tracing::Span;

/// Target of the spans of requests that are not sampled; the export layer filters it out. A
/// `LOG_LEVEL` directive for these spans in the logs names this target, not the module.
pub const UNTRACED: &str = "todo_service::untraced";

/// The configured sampler, set once when span export starts; unset while nothing is exported.
static HEAD: OnceLock<Sampler> = OnceLock::new();

pub(super) fn install(sampler: Sampler) {
    // A second telemetry init (only tests build several) keeps the first sampler.
    let _ = HEAD.set(sampler);
}

/// Whether spans are exported at all; without export the incoming trace context is not even read.
pub fn exporting() -> bool {
    HEAD.get().is_some()
}

/// Whether a request with this incoming context is traced. True while nothing is exported, so the
/// spans keep their usual targets for the logs.
pub fn sampled(parent: &Context) -> bool {
    HEAD.get().is_none_or(|sampler| decide(sampler, parent))
}

fn decide(sampler: &Sampler, parent: &Context) -> bool {
    let parent_span = parent.span();
    let incoming = parent_span.span_context();
    // The caller's trace id when continuing a trace; otherwise a fresh random one, which is what
    // the ratio sampler draws on.
    let trace_id = if incoming.is_valid() {
        incoming.trace_id()
    } else {
        RandomIdGenerator::default().new_trace_id()
    };
    matches!(
        sampler
            .should_sample(
                Some(parent),
                trace_id,
                "request",
                &SpanKind::Server,
                &[],
                &[]
            )
            .decision,
        SamplingDecision::RecordAndSample
    )
}

/// Whether a span started now belongs to a traced request (see the module doc).
pub fn in_traced_request() -> bool {
    if !exporting() {
        return true;
    }
    Span::current()
        .metadata()
        .is_some_and(|m| m.target() != UNTRACED)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    fn remote(sampled: bool) -> Context {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736_u128),
            SpanId::from(0x00f0_67aa_0ba9_02b7_u64),
            flags,
            true,
            TraceState::default(),
        ))
    }

    #[test]
    fn a_parent_based_ratio_follows_the_caller_and_samples_roots_by_the_ratio() {
        let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.25)));
        assert!(decide(&sampler, &remote(true)));
        assert!(!decide(&sampler, &remote(false)));
        let kept = (0..20_000)
            .filter(|_| decide(&sampler, &Context::new()))
            .count();
        // 5,000 expected; ±600 is more than 9 standard deviations (σ ≈ 61).
        assert!((4_400..=5_600).contains(&kept), "kept {kept} of 20000");
    }

    #[test]
    fn without_a_parent_rule_the_ratio_decides_even_for_a_sampled_caller() {
        assert!(!decide(&Sampler::AlwaysOff, &remote(true)));
        assert!(decide(&Sampler::AlwaysOn, &remote(false)));
    }
}
