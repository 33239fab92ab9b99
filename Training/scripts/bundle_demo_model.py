"""Bundle a trained demo model into the library (InstructX2XLib/.../resources/demo_model).

Re-saves the diffusers folder with every weight file under 25 MB (sharded safetensors), and
writes its model card: model_card.json (what every manifest records) and README.md (data,
recipe, acceptance figures and the commands that reproduce them).

Usage: python bundle_demo_model.py WORK_FOLDER   (WORK_FOLDER/run/model, WORK_FOLDER/focal-run/model,
       WORK_FOLDER/acceptance, WORK_FOLDER/guidance-sweep, WORK_FOLDER/relevance-sweep,
       WORK_FOLDER/timing.json as `make demo-model` leaves them). Run it after the training
       (the focal stage's model, Training/configs/demo-focal.yaml, where there is one: the sweeps
       then measure the bundled model), after each sweep (the card takes the guidance scales and
       the relevance draws they chose, and what follows measures with them) and after the
       acceptance, to put its figures into the card. It refuses to write figures measured at
       other settings than the card's.
"""

import json
import shutil
import sys
from pathlib import Path

from instructx2x.loading import load_pipeline
from instructx2x.outputs import atomic_output_dir
from instructx2x_train.phantom import ZONED_FINDINGS

ROOT = Path(__file__).resolve().parents[2]
TARGET = ROOT / "InstructX2XLib" / "src" / "instructx2x" / "resources" / "demo_model"
MAX_FILE = "20MB"
FEW_STEP_SOLVER_STEPS = 10
DEFAULT_GUIDANCE_SCALES = (2.0, 1.5)  # s_T, s_I until guidance_sweep.py has chosen (its sweep.json)
NOTICE = "demonstration model trained on synthetic phantoms - not for clinical use"

work = Path(sys.argv[1])
focal_stage = (work / "focal-run" / "model").is_dir()
model = work / ("focal-run" if focal_stage else "run") / "model"
pipe, info = load_pipeline(model)
config = json.loads((work / "run" / "config.json").read_text())
first_pairs = json.loads((work / "pairs" / "manifest.json").read_text())["settings"]
focal_config: dict = json.loads((work / "focal-run" / "config.json").read_text()) if focal_stage else {}
measured = (work / "acceptance" / "acceptance.json").is_file()  # first bundling: not yet
acceptance = (work / "acceptance" / "acceptance.md").read_text() if measured else "Not measured yet.\n"
report = (
    json.loads((work / "acceptance" / "acceptance.json").read_text())
    if measured
    else {"pairs": {"seed": "-"}}
)
sweep_md = work / "guidance-sweep" / "sweep.md"
sweep = sweep_md.read_text() if sweep_md.is_file() else "Not measured yet.\n"
relevance_md = work / "relevance-sweep" / "sweep.md"
relevance_sweep = relevance_md.read_text() if relevance_md.is_file() else "Not measured yet.\n"
relevance_draws = (
    json.loads((work / "relevance-sweep" / "sweep.json").read_text())["chosen"]["relevance_draws"]
    if (work / "relevance-sweep" / "sweep.json").is_file()
    else 1
)
guidance_scales = DEFAULT_GUIDANCE_SCALES
if (work / "guidance-sweep" / "sweep.json").is_file():
    chosen = json.loads((work / "guidance-sweep" / "sweep.json").read_text())["chosen"]
    guidance_scales = (chosen["guidance_scale"], chosen["image_guidance_scale"])
if (
    measured
    and (report["default_sampler"]["guidance_scale"], report["default_sampler"]["image_guidance_scale"])
    != guidance_scales
):
    sys.exit(
        f"the acceptance was measured at s_T/s_I {report['default_sampler']['guidance_scale']:g}/"
        f"{report['default_sampler']['image_guidance_scale']:g}, the card takes {guidance_scales[0]:g}/"
        f"{guidance_scales[1]:g}: run the acceptance again (Makefile, demo-model)."
    )
if measured and report["default_sampler"].get("relevance_draws", 1) != relevance_draws:
    sys.exit(
        f"the acceptance was measured with {report['default_sampler'].get('relevance_draws', 1)} relevance "
        f"draws, the card takes {relevance_draws}: run the acceptance again (Makefile, demo-model)."
    )
timing = json.loads((work / "timing.json").read_text()) if (work / "timing.json").is_file() else {}
stages = ["pairs", "training"] + (["focal_pairs", "focal_training"] if focal_stage else [])
total_minutes = (
    round(sum(timing[f"{stage}_minutes"] for stage in stages), 1)
    if all(f"{stage}_minutes" in timing for stage in stages)
    else "?"
)
vae_log = json.loads((work / "run" / "pretrained-vae" / "vae_log.json").read_text())
focal_recipe = focal_cost = focal_data = focal_config_name = ""
if focal_stage:
    focal_pairs = json.loads((work / "focal-pairs" / "manifest.json").read_text())
    settings = focal_pairs["settings"]
    zoned_adds = sum(focal_pairs["counts"].get(f"add {finding}", 0) for finding in ZONED_FINDINGS)
    focal_removals = sum(focal_pairs["counts"].get(f"remove {finding}", 0) for finding in ZONED_FINDINGS)
    focal_recipe = (
        f"then the focal stage (`Training/configs/demo-focal.yaml`: {focal_config['steps']} steps more, "
        f"AdamW {focal_config['optim']['learning_rate']}, cosine, on {focal_pairs['pairs']:,} pure pairs "
        f"in which {zoned_adds:,} add consolidation, pneumonia or lung opacity in the zone the instruction "
        f"names and the rest are every other finding and operation: the first stage leaves the zone "
        f"words unlearnt, docs/benchmarks.md), "
    )
    focal_cost = (
        f", focal pairs {timing.get('focal_pairs_minutes', '?')} min, focal stage "
        f"{timing.get('focal_training_minutes', '?')} min"
    )
    focal_config_name = ", refined by `Training/configs/demo-focal.yaml`"
    focal_data = (
        f"\n\nThe focal stage: {focal_pairs['pairs']:,} more pure pairs of the same kind (seed "
        f"{settings['seed']}), in which the three focal opacities are listed "
        f"{settings['findings'].count(ZONED_FINDINGS[0])} times beside the other findings' once and "
        f"{settings['operations'].count('add')} operations in {len(settings['operations'])} add: "
        f"{zoned_adds:,} add a focal opacity in a named zone, {focal_removals:,} remove one, "
        f"{focal_pairs['pairs'] - zoned_adds - focal_removals:,} add or remove another finding "
        f"(`instructx2x-train pure-pairs FOCAL ... --findings ... --operations "
        f"{' '.join(settings['operations'])}`, Makefile)."
    )

card = json.loads((model / "model_card.json").read_text())
card.update(
    {
        "name": "instructx2x-demo",
        "intended_use": NOTICE,
        # DPM-Solver++ 10 steps (the sampler table): direction and accuracy those of 4 steps
        # and DDIM 100 (3 steps: one edit in 48 the wrong way, accuracy 0.03 lower), and the
        # least change outside the lesion of the few-step settings (0.0038 against 0.0052
        # at 3), for under a second more an edit
        "few_step_solver_steps": FEW_STEP_SOLVER_STEPS,
        "guidance_scale": guidance_scales[0],
        "image_guidance_scale": guidance_scales[1],
        "relevance_draws": relevance_draws,
        # trained on phantoms: its edits are measured by the classifiers trained on them
        "classifiers": "cohort-v2",
        "trained_on": f"cohort v2 pure pairs (instructx2x-train pure-pairs --pairs {first_pairs['pairs']} "
        f"--resolution {first_pairs['resolution']} --seed {first_pairs['seed']}), {config['steps']} steps, batch {config['batch']['per_device']}"
        + (
            f"; then {focal_config['steps']} steps on {focal_pairs['pairs']:,} pairs, {zoned_adds:,} of "
            f"them adding a focal opacity in a named zone (Training/configs/demo-focal.yaml)"
            if focal_stage
            else ""
        ),
    }
)
if TARGET.exists():
    shutil.rmtree(TARGET)
with atomic_output_dir(TARGET) as staging:
    pipe.unet.save_pretrained(staging / "unet", max_shard_size=MAX_FILE, safe_serialization=True)
    pipe.vae.save_pretrained(staging / "vae", max_shard_size=MAX_FILE, safe_serialization=True)
    pipe.text_encoder.save_pretrained(
        staging / "text_encoder", max_shard_size=MAX_FILE, safe_serialization=True
    )
    pipe.tokenizer.save_pretrained(staging / "tokenizer")
    pipe.scheduler.save_pretrained(staging / "scheduler")
    shutil.copy(model / "model_index.json", staging / "model_index.json")
    (staging / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    if measured:
        shutil.copy(work / "acceptance" / "examples.png", staging / "acceptance_examples.png")
    (staging / "README.md").write_text(f"""# instructx2x-demo

**{NOTICE}.** It has never seen a real radiograph; what it does to a real film is not a
finding (docs/training.md, "What the demo model does to a real film").

A small InstructPix2Pix-architecture model trained from nothing by `instructx2x-train train`
with `Training/configs/demo.yaml`{focal_config_name}: its own autoencoder (KL, 4x down-sampling, 4 latent channels,
{vae_log["parameters"] / 1e6:.1f} M parameters, reconstruction MAE {vae_log["reconstruction_mae"]:.4f}),
UNet ({sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.1f} M parameters, 8 input channels) and
CLIP-architecture text encoder ({sum(p.numel() for p in pipe.text_encoder.parameters()) / 1e6:.1f} M
parameters, trained with the UNet, Stable Diffusion's CLIP tokenizer). Native resolution 128 px.

## Data
{first_pairs["pairs"]:,} pure counterfactual pairs of synthetic cohort v2 (`instructx2x-train pure-pairs`, seed {first_pairs["seed"]}):
each pair is one phantom patient filmed twice, differing only by one finding inside its
ground-truth mask. Eight findings (pleural effusion, pneumothorax, atelectasis, consolidation,
pneumonia, lung opacity on the left or right; cardiomegaly, edema) x add / remove, balanced; a
quarter of the films carry another finding in both images. Consolidation, pneumonia and lung
opacity lie at the centre of the zone their instruction names. Instructions: "Add the finding of
LEVEL [SIDE] [ZONE zone] FINDING", "Remove the finding of [SIDE] [ZONE zone] FINDING"; consolidation,
pneumonia and lung opacity name their lung zone (upper, mid or lower), e.g. "Add the finding of
moderate left lower zone consolidation".{focal_data}

## Recipe and cost
`make demo-model` reruns everything: pairs, autoencoder ({config["vae_pretraining"]["steps"]} steps),
UNet + text encoder ({config["steps"]} steps of {config["batch"]["per_device"]}, AdamW
{config["optim"]["learning_rate"]}, cosine, EMA {config["ema"]["decay"]}, change-region loss weight
{config["optim"].get("change_region_weight", 0)} (the true lesion's latent cells weigh 1 + that in the loss),
mirror-region weight {config["optim"].get("mirror_region_weight", 0)} (so do the cells of its left-right mirror
where the lesion is not: the side the instruction does not name), no flips: the heart lies on
the patient's left), {focal_recipe}guidance sweep, relevance-draws sweep, acceptance, bundling.
Measured ({timing.get("cpu", "CPU not recorded")}, 2 cores): pairs {timing.get("pairs_minutes", "?")} min,
autoencoder + model {timing.get("training_minutes", "?")} min (of which the autoencoder
{vae_log["seconds"] / 60:.1f} min){focal_cost}, {total_minutes} min in all; the guidance sweep
takes {timing.get("guidance_sweep_minutes", "?")} min, the relevance-draws sweep
{timing.get("relevance_sweep_minutes", "?")} min and the acceptance {timing.get("acceptance_minutes", "?")} min more. {timing.get("note", "")}

## Sampling defaults
`model_card.json` sets what an edit uses where it names none: DPM-Solver++ {FEW_STEP_SOLVER_STEPS}
steps and guidance s_T {guidance_scales[0]:g} / s_I {guidance_scales[1]:g} (the authors' 7.5 / 1.5 were tuned for
Stable Diffusion). The scales were chosen on validation pairs of a seed used neither in
training nor in the acceptance below (`python Training/scripts/guidance_sweep.py WORK`): the
most finding x operation groups meeting the accuracy target, then the highest mean accuracy
reduction, among the settings whose direction and laterality rates (worst and mean) are not
below the authors' by more than one binomial standard error of theirs (a group's direction rests
on 10 edits, a finding's laterality on 20 side trials: a trial or two is noise).

{sweep}
(The guidance sweep runs before the relevance-draws sweep, so its peak column is with one draw.)

The relevance map averages the maps of {relevance_draws} noise draw{"s" if relevance_draws > 1 else ""}, each clipped and
normalised (the authors take one: docs/method.md section 2, step 3; several draws: section
8.1). One draw's map carries that draw's noise, and its maximum often falls outside the
lesion. The draws were chosen on the same kind of validation pairs
(`python Training/scripts/relevance_draws_sweep.py WORK`): the fewest whose peak-in-lesion rate
is within one binomial standard error of the best, among those whose RSE masks meet the
coverage targets. Each draw costs one UNet call on two CFG members per edit.

{relevance_sweep}
## Acceptance (held-out pure pairs, seed {report["pairs"]["seed"]}, never used in training)
`instructx2x-train evaluate-demo OUT --model demo` prints and writes these figures.

{acceptance}
`acceptance_examples.png`: columns = findings; rows = input, edit, true counterfactual, guidance
map over the input with the true lesion outlined in green.

## Evaluation with classifiers
Its edits are measured by the classifiers trained on its phantoms (`"classifiers": "cohort-v2"`
in `model_card.json`; `instructx2x edit --verify` and the Slicer panel use them): the paper's
CMIG / KL / FID and region-mode ablation on the same held-out pairs are in the repository's
`docs/evaluation-demo.md` (`make evaluation`).
""")
sizes = {p.relative_to(TARGET).as_posix(): p.stat().st_size for p in TARGET.rglob("*") if p.is_file()}
assert max(sizes.values()) <= 25 * 1024 * 1024, sizes
load_pipeline("demo")
print(json.dumps({"bundled": str(TARGET), "largest_file_mb": max(sizes.values()) / 2**20}, indent=2))
