//! Head sampling, decided before a request's span exists.
//!
//! The configured sampler (`OTEL_TRACES_SAMPLER`, the SDK's own implementation) is asked here, once
//! per request, before anything else is built for its trace: an unsampled request gets no span and
//! no context at all (see `spans`). The SDK itself then samples always-on, since everything that
//! reaches it was already chosen. Database spans follow their request: they exist only inside a
//! traced request.
//!
//! A parentbased_* sampler follows the caller's `traceparent`, so any client that sends the
//! sampled flag would have every one of its requests traced, whatever the ratio: tracing is the
//! costliest part of a request (loadtest/archive.md#tracing-sdk-spans), and a caller must not be able to buy that for
//! the service. Traces kept only because the caller asked (the ratio alone would not have kept
//! them) draw on `TRACES_FORCED_PER_SECOND`, a lock-free token bucket; past it the request is not
//! traced. With the default sampler (parentbased_always_on) the ratio keeps everything, so nothing
//! is ever forced and the bucket is not consulted.

use std::{num::NonZeroU32, sync::OnceLock};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use opentelemetry::{
    Context,
    trace::{SpanKind, TraceContextExt as _, TraceId},
};
use opentelemetry_sdk::trace::{
    IdGenerator as _, RandomIdGenerator, Sampler, SamplingDecision, ShouldSample as _,
};

/// The configured sampler, and the bound on what callers add to it.
struct Head {
    sampler: Sampler,
    /// The ratio's own rule, when a caller's sampled flag can overrule it.
    root: Option<Sampler>,
    /// The traces callers may force; `None`: none (`TRACES_FORCED_PER_SECOND=0`).
    forced: Option<DefaultDirectRateLimiter>,
}

/// Set once when span export starts; unset while nothing is exported.
static HEAD: OnceLock<Head> = OnceLock::new();

/// `root`: the rule a sampled caller can overrule (see `telemetry::forced_bound`).
pub(super) fn install(sampler: Sampler, root: Option<Sampler>, forced_per_second: u32) {
    // A second telemetry init (only tests build several) keeps the first sampler.
    let _ = HEAD.set(Head::new(sampler, root, forced_per_second));
}

impl Head {
    fn new(sampler: Sampler, root: Option<Sampler>, forced_per_second: u32) -> Head {
        Head {
            sampler,
            root,
            // A burst of one second's worth: a caller's traced request now and then always goes
            // through; a stream of them is held to the rate.
            forced: NonZeroU32::new(forced_per_second)
                .map(|n| RateLimiter::direct(Quota::per_second(n))),
        }
    }
}

/// Whether spans are exported at all; without export the incoming trace context is not even read.
pub fn exporting() -> bool {
    HEAD.get().is_some()
}

/// Whether a request with this incoming context is traced, while spans are exported.
pub fn sampled(parent: &Context) -> bool {
    HEAD.get().is_some_and(|head| decide(head, parent))
}

fn decide(head: &Head, parent: &Context) -> bool {
    let parent_span = parent.span();
    let incoming = parent_span.span_context();
    // The caller's trace id when continuing a trace; otherwise a fresh random one, which is what
    // the ratio sampler draws on.
    let trace_id = if incoming.is_valid() {
        incoming.trace_id()
    } else {
        RandomIdGenerator::default().new_trace_id()
    };
    if !keeps(&head.sampler, Some(parent), trace_id) {
        return false;
    }
    let Some(root) = &head.root else {
        return true;
    };
    if !(incoming.is_valid() && incoming.is_sampled()) || keeps(root, None, trace_id) {
        // The ratio's own choice.
        return true;
    }
    // Kept only because the caller asked.
    head.forced.as_ref().is_some_and(|l| l.check().is_ok())
}

fn keeps(sampler: &Sampler, parent: Option<&Context>, trace_id: TraceId) -> bool {
    matches!(
        sampler
            .should_sample(parent, trace_id, "request", &SpanKind::Server, &[], &[])
            .decision,
        SamplingDecision::RecordAndSample
    )
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

    fn head(sampler: Sampler) -> Head {
        Head::new(sampler, None, 0)
    }

    #[test]
    fn a_parent_based_ratio_follows_the_caller_and_samples_roots_by_the_ratio() {
        let sampler = head(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            0.25,
        ))));
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
        assert!(!decide(&head(Sampler::AlwaysOff), &remote(true)));
        assert!(decide(&head(Sampler::AlwaysOn), &remote(false)));
    }

    /// A sampled caller per trace id, each a different trace.
    fn sampled_caller(n: u128) -> Context {
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from(n.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835) | 1),
            SpanId::from(0x00f0_67aa_0ba9_02b7_u64),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        ))
    }

    #[test]
    fn callers_cannot_force_more_traces_than_the_bound() {
        // parentbased_always_off: every trace a caller asks for is forced.
        let bounded = Head::new(
            Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            Some(Sampler::AlwaysOff),
            5,
        );
        let kept = (0..1_000)
            .filter(|n| decide(&bounded, &sampled_caller(*n)))
            .count();
        // The burst (one second's worth); a refill or two if the loop is slow.
        assert!((5..=7).contains(&kept), "kept {kept} of 1000");
        // Without a caller the ratio (0) decides, and the bound is not spent.
        assert!(!decide(&bounded, &Context::new()));

        let none = Head::new(
            Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            Some(Sampler::AlwaysOff),
            0,
        );
        assert!(!(0..100).any(|n| decide(&none, &sampled_caller(n))));
    }

    #[test]
    fn what_the_ratio_keeps_anyway_does_not_draw_on_the_bound() {
        // parentbased 50 %: about half of the sampled callers' traces the ratio keeps itself;
        // only the other half are forced, and those stop at the bound.
        let head = Head::new(
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.5))),
            Some(Sampler::TraceIdRatioBased(0.5)),
            3,
        );
        let root = Sampler::TraceIdRatioBased(0.5);
        let (mut own, mut forced) = (0, 0);
        for n in 0..2_000 {
            let ctx = sampled_caller(n);
            let id = ctx.span().span_context().trace_id();
            if decide(&head, &ctx) {
                if keeps(&root, None, id) {
                    own += 1;
                } else {
                    forced += 1;
                }
            } else {
                assert!(
                    !keeps(&root, None, id),
                    "a trace the ratio keeps was dropped"
                );
            }
        }
        assert!((800..=1_200).contains(&own), "{own}");
        assert!((3..=5).contains(&forced), "{forced}");
    }
}
