"""What the comparisons run, per task: the methods and their flags, the settings (presets), the rate grids, the seeds,
the test evaluation and the tiny smoke settings (`arith_comparison` runs them; experiments/README.md says why each).
A method's flags may not touch `train.*` or `sampling.*`: every method of a table gets the same budget
(`arith_comparison.check_budget_is_shared`)."""

import dataclasses

METHODS = {
  "DistIL": ["--config.loss.kind=distil"],
  "tokenwise FCE": ["--config.loss.kind=tokenwise_fce"],
  "reverse KL": ["--config.loss.kind=reverse_kl"],  # SDPO-style
  "JSD": ["--config.loss.kind=jsd", "--config.loss.jsd_beta=0.5"],  # OPSD-style
  "GRPO": ["--config.loss.kind=grpo"],  # as published: reduction="auto", on-policy (buffer.mix 0)
  "SFT": ["--config.loss.kind=sft"],
}
# Experiment 3's variance reductions that keep DistIL unbiased: (the method varied, its extra flags). A variant runs at
# its method's chosen rate (no grid of its own) and must sample and update exactly as many responses as the others.
VARIANTS = {
  "DistIL, 16 per prompt": (
    "DistIL",
    ["--config.train.prompts_per_iteration=8", "--config.train.group_size=16", "--config.train.batch_groups=4"],
  ),
  "DistIL, no baseline": ("DistIL", ["--config.loss.baseline=none"]),
}
USES_EXPERT = ("DistIL", "tokenwise FCE", "reverse KL", "JSD", *VARIANTS)  # GRPO and SFT read no expert distribution
KEEP_CHECKPOINTS = ("DistIL", "tokenwise FCE")  # every 10 iterations, for experiments/gradient_variance.py
PRESETS = {
  "oracle": "compare",
  "self": "compare_self",
  "self_live": "compare_self_live",
  "self_sibling": "compare_self_sibling",
  "self_reference": "compare_self_reference",
}
SIZES = {  # the model: the preset's 0.6M-parameter CPU default, or bench/common.py's 125m shape (an accelerator's)
  "small": [],
  "125m": [
    "--config.model.hidden_size=768",
    "--config.model.intermediate_size=2048",
    "--config.model.num_hidden_layers=12",
    "--config.model.num_attention_heads=12",
    "--config.model.num_key_value_heads=4",
    "--config.model.dtype=bfloat16",
  ],
}
LRS = (1e-4, 3e-4, 1e-3)
SEEDS = (0, 1, 2, 3, 4)
FINAL = {"samples": 32, "pass_at": "(1,2,4,8,16,32)"}
SMOKE = [
  "--config.train.iterations=2",
  "--config.train.bc_steps=2",
  "--config.train.bc_batch=8",
  "--config.train.prompts_per_iteration=2",
  "--config.train.group_size=4",  # a sibling-reading expert's LOO baseline needs an even group of >= 4
  "--config.train.batch_groups=2",
  "--config.train.updates_per_iteration=1",
  "--config.eval.every=1",
  "--config.eval.num_prompts=4",
  "--config.eval.samples=2",
  "--config.eval.pass_at=(1,2)",
  "--config.model.hidden_size=32",
  "--config.model.intermediate_size=64",
  "--config.model.num_hidden_layers=1",
  "--config.sampling.max_new_tokens=16",
  "--config.checkpoint.every=1",
]
SMOKE_FINAL = {"samples": 2, "pass_at": "(1,2)"}
SMOKE_ITERATIONS = 2

# -- The real model (--task smollm2) -----------------------------------------------------------------------------------
# Each method as its authors run it. The teacher of DistIL, tokenwise forward CE and the hybrid is the preset's
# (the live student re-prompted: expert.ema_decay 0); SDPO's is an EMA with its published update rate 0.05 (lasgroup/
# SDPO, `teacher_update_rate`) and its divergence over the student's top 100 ids plus a tail bucket; OPSD's is the
# student frozen at the start. The feedback the teacher is shown is the setting's (--expert), so OPSD under sibling
# feedback is JSD with a frozen teacher, and SDPO under reference feedback reads the reference: a methods x feedback
# design. `{iterations}` is the run's length: the hybrid's DistIL weight falls linearly from 1 to 0 over the run.
REAL_METHODS = {
  "DistIL": ["--config.loss.kind=distil"],
  "tokenwise FCE": ["--config.loss.kind=tokenwise_fce"],
  "SDPO": ["--config.loss.kind=reverse_kl", "--config.loss.student_topk=100", "--config.expert.ema_decay=0.95"],
  "OPSD": ["--config.loss.kind=jsd", "--config.loss.jsd_beta=0.5", "--config.expert.ema_decay=1.0"],
  "GRPO": ["--config.loss.kind=grpo"],
  "SFT": ["--config.loss.kind=sft"],
  # DistIL's weight makes the two parts' gradients comparable at the start: on SmolLM2 (sibling feedback, seed 0,
  # the same batch) DistIL's gradient norm before clipping is 305.6 at iteration 1 and up to 2,000 later, GRPO's
  # 0.4-2.6 (its sequence-summed score term against GRPO's token mean). At weight 1 the sum is DistIL's direction for
  # the whole run (the first run at weight 1 had DistIL's gradient norm to 4 digits). experiments/README.md, "The
  # hybrid's weight", says what this one-batch choice leaves.
  "DistIL+GRPO": [
    "--config.loss.kind=distil_grpo",
    "--config.loss.distil_weight=0.001",
    "--config.loss.distil_weight_decay_iterations={iterations}",
  ],
}
# DistIL's J with the cost c_t = KL(q_t || pi_t) instead of the paper's cross-entropy H(q_t) + KL: a self teacher's
# entropy (0.8-1.1 nats a token on SmolLM2 at T = 0.7, 3-5x the KL) is then not charged per future token, so the
# score term stops rewarding short responses for being short (experiments/README.md, "What we learned"). At
# DistIL's chosen rate: a diagnostic of the paper's objective, not a method of its own.
# `loss.terminal="hold"` (surrogate.py) removes the other half of that incentive: with either cost a response that
# stops early forfeits every future cost under the paper's J, and under "hold" keeps paying its stopping state's.
# Beside tokenwise FCE (the local term alone, which did not shorten), it asks whether the score term's loss on
# SmolLM2 is its length incentive or something else it does.
REAL_VARIANTS = {
  "DistIL, KL cost": ("DistIL", ["--config.loss.cost=kl"]),
  "DistIL, held terminal": ("DistIL", ["--config.loss.terminal=hold"]),
}
REAL_SETTINGS = {
  "sibling": "smollm2_sibling",
  "reference": "smollm2_reference",
  "hard": "smollm2_hard",
  "hard_reference": "smollm2_hard_reference",
}
# SmolLM2's rate is 1e-5 in its preset (README, "Figures"); a grid around it, widened where a method picks an edge.
REAL_LRS = (3e-6, 1e-5, 3e-5)
REAL_SEEDS = (0, 1, 2)
REAL_FINAL = {"samples": 8, "pass_at": "(1,2,4,8)", "num_prompts": 64}
# Tiny settings on the same presets: a random 1-layer model and the task's own small tokenizer instead of the
# checkpoint, no behaviour cloning (as the presets), the arithmetic smoke's batch and evaluation sizes.
REAL_SMOKE = [
  *(f for f in SMOKE if not f.startswith("--config.train.bc_")),
  "--config.model.hf_path=",
  "--config.model.remat=none",
  "--config.sampling.max_new_tokens=16",
  "--config.expert.max_prompt_tokens=96",
]


@dataclasses.dataclass(frozen=True)
class Task:
  """What differs between the protocol's tasks; the grid, the seeds, the test evaluation and the statistics do not.
  `expert` / `no_expert` are the flags of a method that reads / reads no teacher in a self-expert setting (arith
  names the self expert again, as its commands always have); `shares` maps a setting to
  the one whose runs of such methods are the same runs (the presets may differ in the expert's section only)."""

  config: str
  settings: dict
  methods: dict
  variants: dict
  uses_expert: tuple
  keep_checkpoints: tuple
  sizes: dict
  lrs: tuple
  seeds: tuple
  final: dict
  smoke: list
  expert: list
  no_expert: list
  shares: dict
  prune: bool = False  # drop a run's weights once nothing reads them (SmolLM2's take ~2 GB a run)
  test_each_run: bool = False  # test every grid run as it finishes, while its weights exist (see `run_protocol`)
  test_start: bool = False  # test the checkpoint every run starts from on every seed, as a run is (`Comparison.start`)
  check_edge: bool = False  # a rate chosen at the grid's edge is checked one step beyond it (`beyond_edge`)


TASKS = {
  "arith": Task(
    "configs/arith.py",
    PRESETS,
    METHODS,
    VARIANTS,
    USES_EXPERT,
    KEEP_CHECKPOINTS,
    SIZES,
    LRS,
    SEEDS,
    FINAL,
    SMOKE,
    ["--config.expert.kind=self"],
    ["--config.expert.kind=oracle", "--config.expert.feedback=any"],
    {},
  ),
  "smollm2": Task(
    "configs/math.py",
    REAL_SETTINGS,
    REAL_METHODS,
    REAL_VARIANTS,
    ("DistIL", "tokenwise FCE", "SDPO", "OPSD", "DistIL+GRPO", *REAL_VARIANTS),
    (),
    {"small": []},  # one size so far; a bigger checkpoint would be an entry setting model.hf_path (an accelerator's)
    REAL_LRS,
    REAL_SEEDS,
    REAL_FINAL,
    REAL_SMOKE,
    [],
    [],  # GRPO and SFT keep the preset's self expert: its loss never reads it (no teacher forward)
    {"reference": "sibling", "hard_reference": "hard"},
    prune=True,
    test_each_run=True,
    test_start=True,
    check_edge=True,
  ),
}
