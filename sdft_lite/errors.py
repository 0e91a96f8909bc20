"""User errors, and turning exceptions into (error, hint) pairs for status.json and the CLI."""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix (recipe, data, run name, model path...): the CLI prints
    `error: <message>` and exits 2, without a traceback. `hint`, when set, says what to change."""

    hint: str | None = None


# Older user-facing classes that do not derive from UserError yet, recognised by name.
USER_ERRORS = (
    "RecipeError",
    "DataError",
    "PromptError",
    "ModelLoadError",
    "RunExistsError",
    "TrainError",
    "BackendError",
    "PlanError",
)


def is_user_error(e: BaseException) -> bool:
    return isinstance(e, UserError) or type(e).__name__ in USER_ERRORS


def describe_failure(e: BaseException) -> tuple[str, str | None]:
    """A one-line error and, when we know one, a hint that says what to change."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted", "resume with: sdft-lite train <recipe> --resume"
    text = str(e).strip() or type(e).__name__
    if getattr(e, "hint", None):
        return text, e.hint
    if is_user_error(e):
        return (
            text,
            "fix the recipe or data as the error says, then run again (add --overwrite to reuse the run name)",
        )
    if "out of memory" in text.lower():
        return text, (
            "out of memory: lower train.batch_size or generation.max_new_tokens, raise "
            "train.gradient_accumulation_steps, set model.load_in_4bit: true, or lower loss.chunk_budget_mb"
        )
    return (
        f"{type(e).__name__}: {text}",
        "unexpected error: see train.log in the run folder for the traceback",
    )
