"""`invcoss bench`: train every method stage by stage on real images, measure forgetting, write the comparison.

Plan of one run (core methods seed by seed in the order given, then the ablations):
1. the first stage (MAE on the first modality) is trained once per seed with the one stage loop and reused by
   every sequential method: each method's own first-stage products (inversion pool, real buffer, EWC Fisher) are
   computed from those trained weights and statistics through its `ReplayStrategy.end_stage` (`finish_stage`);
2. each sequential method then runs the later stages with `run_stage` and its strategy; `joint` runs one stage
   on the first modality while `JointReplay` feeds the others with the MAE loss;
3. after every stage the model is evaluated (`evaluate_model`): probes on every task, held-out reconstruction on
   every modality seen so far. The first stage's evaluation is shared like its weights.
Everything lands under `out/runs/` (artifacts + per-stage JSON), so a rerun with the same settings resumes and
only trains what is missing — e.g. a `finetune`-only forgetting check followed by all methods; changed evaluation
settings re-evaluate the stored artifacts without retraining. `shard` splits the plan over parallel processes.
Outputs: `results.json` (see `aggregate`), `report.md`, and PNG figures (see `invcoss_core.evaluation.plots`).

Modules: `plan` (jobs and shards), `run` (`run_bench`, outputs), `stages` (one stage reused or trained, evaluated),
`store` (records, fingerprints), `status` (progress, time left), `aggregate` (results.json), `forgetting` (the
precondition check).
"""

from invcoss_core.evaluation.bench.aggregate import PRIMARY_PROBE, aggregate, compute_seconds, replay_bytes_real
from invcoss_core.evaluation.bench.forgetting import forgetting_check
from invcoss_core.evaluation.bench.plan import Job, plan_jobs
from invcoss_core.evaluation.bench.run import REPORT_FILE, RESULTS_FILE, method_diagnostics, run_bench, write_outputs
from invcoss_core.evaluation.bench.stages import finish_stage
from invcoss_core.evaluation.bench.status import BenchError, BenchStatus, StatusSink
from invcoss_core.evaluation.bench.store import StageRecord

__all__ = [
    "PRIMARY_PROBE",
    "REPORT_FILE",
    "RESULTS_FILE",
    "BenchError",
    "BenchStatus",
    "Job",
    "StageRecord",
    "StatusSink",
    "aggregate",
    "compute_seconds",
    "finish_stage",
    "forgetting_check",
    "method_diagnostics",
    "plan_jobs",
    "replay_bytes_real",
    "run_bench",
    "write_outputs",
]
