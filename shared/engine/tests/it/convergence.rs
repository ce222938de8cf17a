//! The convergence property: whatever the interleaving of edits on both sides, with events
//! duplicated and reordered, both sides end equal on every mapped field, and dualwrite writes
//! at most twice per edit (no ping-pong).

use dualwrite_core::map::{ConflictPolicy, DeletePolicy};
use dualwrite_core::{ChangeEvent, Side};
use proptest::prelude::*;

use crate::harness::World;

#[derive(Debug, Clone)]
enum Step {
    /// A user edit: side, record (0..3), which field (name or credit), value, whether time passes.
    Edit {
        crm: bool,
        record: usize,
        name: bool,
        value: i64,
        tick: bool,
    },
    /// Process one pending event (by index, modulo), keeping a copy when `duplicate`.
    Deliver { pick: usize, duplicate: bool },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (
            any::<bool>(),
            0..3usize,
            any::<bool>(),
            0..4i64,
            any::<bool>()
        )
            .prop_map(|(crm, record, name, value, tick)| Step::Edit {
                crm,
                record,
                name,
                value,
                tick
            }),
        (any::<usize>(), any::<bool>())
            .prop_map(|(pick, duplicate)| Step::Deliver { pick, duplicate }),
    ]
}

async fn run(steps: Vec<Step>, final_order: Vec<usize>) -> Result<(), TestCaseError> {
    let w = World::accounts(ConflictPolicy::LastWriterWins, DeletePolicy::Propagate);
    let mut pool: Vec<ChangeEvent> = Vec::new();
    let mut edits = 0usize;
    for s in steps {
        match s {
            Step::Edit {
                crm,
                record,
                name,
                value,
                tick,
            } => {
                let side = if crm { Side::Crm } else { Side::Erp };
                let number = format!("R{record}");
                let ev = if name {
                    w.edit_account(side, &number, Some(&format!("n{value}")), None)
                } else {
                    w.edit_account(side, &number, None, Some(value))
                };
                edits += 1;
                pool.push(ev);
                if tick {
                    w.tick();
                }
            }
            Step::Deliver { pick, duplicate } => {
                pool.extend(w.crm.take_echoes());
                pool.extend(w.erp.take_echoes());
                if pool.is_empty() {
                    continue;
                }
                let i = pick % pool.len();
                let ev = if duplicate {
                    pool[i].clone()
                } else {
                    pool.remove(i)
                };
                let out = w.engine.process(&ev).await;
                let out =
                    out.map_err(|e| TestCaseError::fail(format!("processing failed: {e}")))?;
                pool.extend(out.released.into_iter().map(|p| p.event));
            }
        }
    }
    // Deliver what is left in a random order, then settle the echoes.
    let mut rest = Vec::new();
    for k in final_order {
        if pool.is_empty() {
            break;
        }
        rest.push(pool.remove(k % pool.len()));
    }
    rest.append(&mut pool);
    w.settle(rest).await;

    for r in 0..3 {
        let number = format!("R{r}");
        let crm = w.account(Side::Crm, &number);
        let erp = w.account(Side::Erp, &number);
        prop_assert_eq!(&crm, &erp, "record {} differs between the sides", number);
    }
    prop_assert!(
        w.writes() <= 2 * edits,
        "{} writes for {} edits",
        w.writes(),
        edits
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn both_sides_converge_without_ping_pong(
        steps in proptest::collection::vec(step(), 1..40),
        final_order in proptest::collection::vec(any::<usize>(), 0..40),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(run(steps, final_order))?;
    }
}
