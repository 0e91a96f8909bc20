"""The Gradio layout: five tabs wired to handlers in `handlers.py`.

Every event that a client may call has an `api_name`, so `gradio_client` (and the tests) drive
the app through the same endpoints as the browser.
"""

from __future__ import annotations

import gradio as gr

from .form import (
    FORM_PARAMS,
    GENERIC_KEYS,
    MODEL_KINDS,
    NO_COLUMN,
    SECTIONS,
    default,
    demo_recipe,
    form_values,
    help_text,
    param,
    widget_kind,
)
from .handlers import Handlers, form_handler
from .views import COMPARE_METRICS, CURVES

REFRESH_S = 2.0  # how often the Runs tab re-reads the run folders
CSS = """
.sdft-progress-text {margin-top: 4px; font-size: 0.95em}
.sdft-mono textarea {font-family: ui-monospace, monospace !important; font-size: 0.85em}
"""
THEME_FONTS = dict(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def _field(key: str, value):
    """A widget for one recipe key: type, choices and help text from the schema, starting at `value`."""
    kind, choices, optional = widget_kind(key)
    label, info = key, help_text(key)
    if kind == "dropdown":
        return gr.Dropdown(choices=choices, value=value, label=label, info=info)
    if kind == "checkbox":
        return gr.Checkbox(value=value, label=label, info=info)
    if kind in ("int", "float") and optional:
        # A browser sends an emptied gr.Number as 0, not as "unset": optional numbers are text fields.
        info += "" if "empty" in info.lower() else " Empty = unset."
        return gr.Textbox(value="" if value is None else str(value), label=label, info=info)
    if kind in ("int", "float"):
        return gr.Number(value=value, label=label, info=info, precision=0 if kind == "int" else None)
    lines = 4 if key == "data.teacher_template" else 1
    return gr.Textbox(value=value or "", label=label, info=info, lines=lines)


def _plot(title: str, elem_id: str, y_title: str, color: str | None = None):
    return gr.LinePlot(
        x="step",
        y="value",
        color=color,
        title=title,
        x_title="step",
        y_title=y_title,
        label=title,
        elem_id=elem_id,
    )


def build_app(h: Handlers) -> gr.Blocks:
    with gr.Blocks(title="sdft-lite", analytics_enabled=False) as demo:
        gr.Markdown(
            f"## sdft-lite: self-distillation fine-tuning\nRuns are read from `{h.runs_dir}`; each "
            "training is `sdft-lite train` in its own process, so closing this page or restarting the app "
            "loses nothing."
        )
        with gr.Tabs():
            with gr.Tab("New run", id="new"):
                _new_run_tab(h)
            with gr.Tab("Runs", id="runs") as runs_tab:
                run_dd = _runs_tab(h)
            with gr.Tab("Compare", id="compare") as compare_tab:
                cmp_runs = _compare_tab(h)
            with gr.Tab("Try", id="try") as try_tab:
                try_run = _try_tab(h)
            with gr.Tab("Export", id="export") as export_tab:
                export_run = _export_tab(h)
        runs_tab.select(h.run_choices, outputs=[run_dd], api_visibility="private", show_progress="hidden")
        # Each tab's run list is refreshed when the tab opens (the selection is kept if still valid).
        for tab, choices, dropdown in (
            (compare_tab, h.run_choices_multi, cmp_runs),
            (try_tab, h.adapter_choices, try_run),
            (export_tab, h.adapter_choices, export_run),
        ):
            tab.select(
                choices,
                inputs=[dropdown],
                outputs=[dropdown],
                api_visibility="private",
                show_progress="hidden",
            )
    return demo


# --------------------------------------------------------------------------- New run


def _new_run_tab(h: Handlers):
    # The form opens on the built-in demo model with the quickstart recipe's settings (the schema's
    # defaults suit real models, not the demo); `base` holds the loaded recipe's raw mapping, so keys
    # the form does not show (eval sets, probes) are kept.
    demo = demo_recipe()
    initial = form_values(demo) if demo else {}
    base = gr.State(demo)
    with gr.Accordion("Load an existing recipe YAML into the form", open=False):
        with gr.Row():
            recipe_file = gr.File(
                label="recipe .yaml", file_types=[".yaml", ".yml"], type="filepath", scale=1
            )
            with gr.Column(scale=2):
                recipe_path = gr.Textbox(
                    label="or a path on this machine", placeholder="recipes/quickstart.yaml"
                )
                load_btn = gr.Button("Load recipe")
    with gr.Row():
        with gr.Column():
            gr.Markdown("### Model")
            model_kind = gr.Radio(MODEL_KINDS, value=MODEL_KINDS[0], label="model", show_label=False)
            model_name = gr.Textbox(
                value="sdft-lite/demo", label="model.name", info=help_text("model.name"), interactive=False
            )
        with gr.Column():
            gr.Markdown("### Dataset")
            data_file = gr.File(
                elem_id="data-file",
                label="upload a data file (.jsonl .json .csv .parquet)",
                type="filepath",
                file_types=[".jsonl", ".json", ".csv", ".parquet"],
                height=90,
            )
            with gr.Row():
                data_source = gr.Textbox(
                    value=initial.get("data_source") or h.demo_data() or "",
                    label="data.source",
                    info=help_text("data.source"),
                    scale=3,
                )
                split = gr.Textbox(value="train", label="data.split", info=help_text("data.split"), scale=1)
    preview_btn = gr.Button("Preview data", size="sm")
    data_msg = gr.Markdown()
    data_preview = gr.Dataframe(label="first rows", interactive=False, wrap=True, max_height=260)
    with gr.Row():
        prompt_col = gr.Dropdown(
            [initial.get("data__prompt_column", default("data.prompt_column"))],
            value=initial.get("data__prompt_column", default("data.prompt_column")),
            label="data.prompt_column",
            info=help_text("data.prompt_column"),
            allow_custom_value=True,
        )
        demo_col = gr.Dropdown(
            [initial.get("data__demonstration_column", default("data.demonstration_column"))],
            value=initial.get("data__demonstration_column", default("data.demonstration_column")),
            label="data.demonstration_column",
            info=help_text("data.demonstration_column"),
            allow_custom_value=True,
        )
        answer_col = gr.Dropdown(
            sorted({NO_COLUMN, initial.get("data__answer_column", NO_COLUMN)}),
            value=initial.get("data__answer_column", NO_COLUMN),
            label="data.answer_column",
            info=help_text("data.answer_column"),
            allow_custom_value=True,
        )
    with gr.Accordion("Rendered prompts for the first row (loads the tokenizer)", open=False):
        prompts_btn = gr.Button("Render prompts", size="sm")
        prompts_msg = gr.Markdown()
        with gr.Row():
            student_prompt = gr.Textbox(label="student sees", lines=6, elem_classes="sdft-mono")
            teacher_prompt = gr.Textbox(label="teacher sees", lines=6, elem_classes="sdft-mono")
    generic = {}
    for title, keys in SECTIONS.items():
        with gr.Accordion(title, open=title in ("Method and teacher", "Training budget")):
            for i in range(0, len(keys), 3):
                with gr.Row():
                    for key in keys[i : i + 3]:
                        generic[key] = _field(key, initial.get(param(key), default(key)))
    with gr.Row():
        run_name = gr.Textbox(
            "", label="output.name", info="Run folder name. Empty = method-teacher-date-time.", scale=2
        )
        extra = gr.Textbox(
            "",
            label="extra keys",
            lines=2,
            scale=3,
            placeholder="model.lora.target_modules=[q_proj,v_proj]",
            info="Any other recipe key, one key.sub=value per line (as on the sdft-lite command line).",
        )
    with gr.Row():
        check_btn = gr.Button("Check recipe")
        start_btn = gr.Button("Start training", variant="primary")
    message = gr.Markdown(elem_id="new-run-message")
    with gr.Row():
        yaml_box = gr.Code(label="recipe.yaml", language="yaml", interactive=False, lines=20, max_lines=40)
        with gr.Column():
            command = gr.Code(
                label="command the app runs (copy it to run the same training yourself)",
                language="shell",
                interactive=False,
                lines=3,
                wrap_lines=True,
            )
            plan = gr.Code(
                label="memory plan on this machine's device (sdft-lite plan)",
                interactive=False,
                lines=12,
                max_lines=30,
                show_line_numbers=False,
            )

    special = [model_kind, model_name, data_source, split, prompt_col, demo_col, answer_col, run_name, extra]
    form = dict(zip(FORM_PARAMS, special + [generic[k] for k in GENERIC_KEYS], strict=True))
    with_base = {**form, "base": base}
    columns = [data_preview, prompt_col, demo_col, answer_col, data_msg]
    preview_inputs = [data_source, split, prompt_col, demo_col, answer_col]

    form_outputs = [form[p] for p in FORM_PARAMS] + [base, message]
    # .input, not .change: loading a recipe sets the radio too, and must not be overwritten by the demo's.
    model_kind.input(
        h.model_kind_changed,
        inputs=[model_kind, model_name, data_source, base],
        outputs=form_outputs,
        api_visibility="private",
    )
    data_file.upload(h.upload_data, inputs=[data_file], outputs=[data_source], api_name="upload_data").then(
        h.preview, inputs=preview_inputs, outputs=columns, api_visibility="private"
    )
    preview_btn.click(h.preview, inputs=preview_inputs, outputs=columns, api_name="preview_data")
    for trigger in (data_source.submit, split.submit):
        trigger(h.preview, inputs=preview_inputs, outputs=columns, api_visibility="private")
    prompts_btn.click(
        form_handler(h.render_prompts),
        inputs_kwargs=with_base,
        outputs=[student_prompt, teacher_prompt, prompts_msg],
        api_name="render_prompts",
    )
    outputs = [message, yaml_box, command, plan]
    check_btn.click(form_handler(h.check), inputs_kwargs=with_base, outputs=outputs, api_name="check")
    # Disabled while it works (a double click must not submit twice; Start is idempotent as well).
    start_btn.click(
        lambda: gr.update(interactive=False), outputs=[start_btn], api_visibility="private", queue=False
    ).then(form_handler(h.start), inputs_kwargs=with_base, outputs=outputs, api_name="start").then(
        lambda: gr.update(interactive=True), outputs=[start_btn], api_visibility="private", queue=False
    )

    recipe_file.upload(
        h.load_recipe_file, inputs=[recipe_file], outputs=form_outputs, api_name="load_recipe_file"
    )
    load_btn.click(h.load_recipe, inputs=[recipe_path], outputs=form_outputs, api_name="load_recipe")


# --------------------------------------------------------------------------- Runs


def _runs_tab(h: Handlers):
    table = gr.Dataframe(
        value=h.runs_table,
        label="runs (click a row)",
        interactive=False,
        max_height=300,
        elem_id="runs-table",
    )
    with gr.Row():
        run_dd = gr.Dropdown(
            h.run_names(), value=None, label="selected run", allow_custom_value=True, scale=3
        )
        stop_btn = gr.Button("Stop and save", scale=1)
        cancel_btn = gr.Button("Cancel", variant="stop", scale=1)
        resume_btn = gr.Button("Resume", scale=1)
        delete_btn = gr.Button("Delete", scale=1)
    # Cancel and Delete lose work: they ask here first, naming the run.
    pending = gr.State(None)  # (action, run name) waiting for its "yes"
    with gr.Row(visible=False, elem_id="confirm-row") as confirm_row:
        question = gr.Markdown(scale=3)
        yes_btn = gr.Button("Yes", variant="stop", scale=1)
        no_btn = gr.Button("No, keep it", scale=1)
    action_msg = gr.Markdown(elem_id="run-action-message")
    progress = gr.HTML(elem_id="run-progress")
    error = gr.Markdown(elem_id="run-error")
    with gr.Row():
        plots = [_plot(title, f"plot-{key}", key) for title, key in CURVES[:2]]
    with gr.Row():
        plots += [_plot(title, f"plot-{key}", key) for title, key in CURVES[2:]]
    eval_plot = _plot(
        "eval accuracy (new_task = new skill, others = retention)", "plot-eval", "accuracy", color="series"
    )
    eval_note = gr.Markdown(elem_id="run-eval-note")
    samples = gr.Dataframe(
        label="latest samples (student completion vs demonstration)",
        interactive=False,
        wrap=True,
        max_height=360,
    )
    log = gr.Textbox(
        label="log tail (train.log)", lines=12, max_lines=12, elem_classes="sdft-mono", autoscroll=True
    )
    with gr.Accordion("status.json", open=False):
        status = gr.JSON()
    view = [progress, error, *plots, eval_plot, eval_note, samples, log, status]

    timer = gr.Timer(REFRESH_S)
    timer.tick(
        h.refresh,
        inputs=[run_dd],
        outputs=[table, *view],
        api_visibility="private",
        show_progress="hidden",
        concurrency_limit=None,
    )
    table.select(h.select_row, outputs=[run_dd], api_visibility="private", show_progress="hidden")
    run_dd.change(h.run_view, inputs=[run_dd], outputs=view, api_name="run_view", show_progress="hidden")
    gr.Button("Refresh", size="sm").click(h.runs_table, outputs=[table], api_name="runs")
    stop_btn.click(h.stop, inputs=[run_dd], outputs=[action_msg], api_name="stop")
    resume_btn.click(h.resume, inputs=[run_dd], outputs=[action_msg], api_name="resume")
    asked = [confirm_row, question, yes_btn, pending, action_msg]
    for btn, action in ((cancel_btn, "cancel"), (delete_btn, "delete")):
        btn.click(
            lambda name, action=action: h.ask(action, name),
            inputs=[run_dd],
            outputs=asked,
            api_visibility="private",
        )
    yes_btn.click(
        h.confirm,
        inputs=[pending],
        outputs=[confirm_row, pending, action_msg, run_dd],
        api_visibility="private",
    )
    no_btn.click(h.dismiss, outputs=[confirm_row, pending, action_msg], api_visibility="private")
    # A question is about the run it names: another selection withdraws it.
    run_dd.change(
        lambda: (gr.update(visible=False), None), outputs=[confirm_row, pending], api_visibility="private"
    )
    gr.api(h.cancel, api_name="cancel")  # API clients confirm by calling
    gr.api(h.delete, api_name="delete")
    return run_dd


# --------------------------------------------------------------------------- Compare, Try, Export


def _compare_tab(h: Handlers):
    with gr.Row():
        runs = gr.Dropdown(
            h.run_names(), value=[], multiselect=True, label="runs to compare (two or more)", scale=3
        )
        metric = gr.Dropdown(COMPARE_METRICS, value="loss", label="curve", scale=1)
    plot = gr.LinePlot(
        x="step",
        y="value",
        color="series",
        color_title="run",
        title="curves",
        label="curves",
        elem_id="compare-plot",
    )
    table = gr.Markdown()
    btn = gr.Button("Compare", variant="primary")
    # The browser keeps a plot's series (its colour domain) from the first value it drew and only swaps
    # the data after that: clear the plot first, so each comparison draws the runs it names.
    clear = dict(fn=lambda: gr.update(value=None), outputs=[plot], api_visibility="private", queue=False)
    compare = dict(fn=h.compare, inputs=[runs, metric], outputs=[plot, table])
    btn.click(**clear).then(**compare, api_name="compare")
    metric.change(**clear).then(**compare, api_visibility="private")
    return runs


def _try_tab(h: Handlers):
    gr.Markdown(
        "Greedy answers of the base model (adapter off) and of a run's adapter to the same prompt. "
        "The first try of a run loads its model (cached afterwards)."
    )
    with gr.Row():
        run = gr.Dropdown(
            h.adapter_names(), label="run to try (with a saved adapter)", allow_custom_value=True, scale=3
        )
        max_new = gr.Slider(1, 512, value=64, step=1, label="max new tokens", scale=1)
    prompt = gr.Textbox(
        label="prompt to try", lines=3, placeholder="a question in the style of the training data"
    )
    btn = gr.Button("Generate", variant="primary")
    msg = gr.Markdown()
    with gr.Row():
        base_out = gr.Textbox(label="base model", lines=6, elem_classes="sdft-mono")
        tuned_out = gr.Textbox(label="with the run's adapter", lines=6, elem_classes="sdft-mono")
    btn.click(h.try_prompt, inputs=[run, prompt, max_new], outputs=[base_out, tuned_out, msg], api_name="try")
    return run


def _export_tab(h: Handlers):
    run = gr.Dropdown(
        h.adapter_names(), label="run to export (with a saved adapter)", allow_custom_value=True
    )
    with gr.Row():
        zip_btn = gr.Button("Download the adapter (.zip)")
        merge_btn = gr.Button("Merge into the base model and download")
    msg = gr.Markdown()
    file = gr.File(label="download", interactive=False)
    zip_btn.click(h.export_adapter, inputs=[run], outputs=[file, msg], api_name="export_adapter")
    merge_btn.click(h.export_merged, inputs=[run], outputs=[file, msg], api_name="export_merged")
    return run


def theme():
    return gr.themes.Soft(**THEME_FONTS)
