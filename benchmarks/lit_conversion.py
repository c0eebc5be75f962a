"""LiT's recipe pays (seed 003): a linear-attention student converted from a trained softmax teacher reaches the
teacher's held-out loss in fewer steps than the same student trained from scratch.

    python benchmarks/lit_conversion.py [--teacher-steps 2000] [--student-steps 1000] [--validate-every 100]

On the digits that ship with scikit-learn (32 px, the pixel codec, real MiniLM captions: configs/demo/encode.yaml):
1. the teacher: CrossDiT-tiny (PixArt-style: softmax self-attention, softmax cross-attention to the text) trained
   with the demo's recipe (configs/demo/train.yaml);
2. the student from scratch: LiT-T2I-tiny (ReLU linear self-attention, the same softmax cross-attention) with LiT's
   recipe (configs/train/lit-tiny-cpu.yaml) minus the teacher;
3. the converted student: the same recipe as written: `init_from` the teacher (every weight but the linear
   attention's) and the hybrid distillation from it (λ1, λ2 of the recipe).
All three train with the same batch size and are validated on the held-out digits with the same t grid and noise.
Prints both students' held-out loss curves and the first validated step at which each is within `--tolerance` of the
teacher's final held-out loss; `--out` writes them as JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.digit_recipes import (  # noqa: E402
    RecipeRun,
    add_output_options,
    encode_digits,
    run_comparison,
    train_recipe,
)

TEACHER_RECIPE = "configs/demo/train.yaml"
STUDENT_RECIPE = "configs/train/lit-tiny-cpu.yaml"
DIGIT_MODEL = "{latent_channels: 48, text_dim: 384}"  # the demo cache: 48-channel pixel-codec latents, MiniLM text


def common_overrides(caches, checkpoints: Path, *, batch_size: int, validate_every: int, steps: int) -> list[str]:
    return [f"data.uris=[{caches.train}]", f"validation.uris=[{caches.held_out}]",
            f"validation.every_steps={validate_every}", "validation.max_batches=5", "validation.holdout_shards=0",
            f"batch_size={batch_size}", f"max_steps={steps}", f"checkpoint.uri={checkpoints}",
            f"checkpoint.every_steps={steps}", "checkpoint.resume_from=null", "samples.prompts=[]"]


def compare(out: Path, *, teacher_steps: int, student_steps: int, validate_every: int, batch_size: int,
            tolerance: float) -> dict:
    caches = encode_digits(out, "configs/demo/encode.yaml", class_folders=False, size=32)
    teacher = train_recipe("teacher CrossDiT-tiny", TEACHER_RECIPE, [
        *common_overrides(caches, out / "teacher", batch_size=batch_size, validate_every=teacher_steps,
                          steps=teacher_steps),
        "model.preset=CrossDiT-tiny", f"model.overrides={DIGIT_MODEL}"])
    student = [*common_overrides(caches, out / "unused", batch_size=batch_size, validate_every=validate_every,
                                 steps=student_steps), "model.preset=LiT-T2I-tiny", f"model.overrides={DIGIT_MODEL}"]
    scratch = train_recipe("LiT-T2I-tiny from scratch", STUDENT_RECIPE, [
        *student, f"checkpoint.uri={out / 'scratch'}", "teacher=null", "init_from=null"])
    converted = train_recipe("LiT-T2I-tiny converted", STUDENT_RECIPE, [
        *student, f"checkpoint.uri={out / 'converted'}", f"teacher={teacher.checkpoints}",
        f"init_from={teacher.checkpoints}"])
    return report(teacher, scratch, converted, tolerance)


def report(teacher: RecipeRun, scratch: RecipeRun, converted: RecipeRun, tolerance: float) -> dict:
    teacher_loss = teacher.val_losses()[max(teacher.val_losses())]
    target = teacher_loss * (1 + tolerance)
    result = {
        "teacher_val_loss": teacher_loss, "target_val_loss": target, "tolerance": tolerance,
        "teacher_steps": max(teacher.val_losses()),
        "students": {run.name: {"val_loss": run.val_losses(), "steps_to_target": run.first_step_at_or_below(target),
                                "seconds": run.seconds} for run in (scratch, converted)},
    }
    print(f"teacher held-out loss {teacher_loss:.4f} after {result['teacher_steps']} steps; target <= {target:.4f}")
    print(f"{'step':>6} {'scratch':>10} {'converted':>10}")
    for step, loss in scratch.val_losses().items():
        print(f"{step:>6} {loss:>10.4f} {converted.val_losses().get(step, float('nan')):>10.4f}")
    for run in (scratch, converted):
        reached = run.first_step_at_or_below(target)
        print(f"{run.name}: " + (f"reaches the teacher's loss at step {reached}" if reached is not None
                                 else f"does not reach the teacher's loss in {max(run.val_losses())} steps"))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-steps", type=int, default=2000)
    parser.add_argument("--student-steps", type=int, default=1000)
    parser.add_argument("--validate-every", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="a student reaches the teacher when its held-out loss is <= teacher's x (1 + this)")
    add_output_options(parser)
    args = parser.parse_args(argv)
    return run_comparison(compare, args, "lit-conversion-", teacher_steps=args.teacher_steps,
                          student_steps=args.student_steps, validate_every=args.validate_every,
                          batch_size=args.batch_size, tolerance=args.tolerance)


if __name__ == "__main__":
    sys.exit(main())
