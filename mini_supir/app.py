"""A web page for restoring photos: drop a photo, pick a mode, compare before / after, download the PNG.

    pip install -e ".[ui]"
    python -m mini_supir.app                      # http://127.0.0.1:7860, this machine only
    python -m mini_supir.app --host 0.0.0.0 --port 8080 --lora-dir loras/

Fast mode (Real-ESRGAN) works offline on any machine; the SUPIR modes need the SDXL and SUPIR files (the
page lists what is here and what a missing file needs). One job runs at a time; the others wait in the
queue and see their place in it. See docs/app.md. The work itself is in app_jobs.py.
"""
from __future__ import annotations

import argparse
import os
import queue
import secrets
import sys
import tempfile
import threading
from pathlib import Path

from . import app_jobs, cli, presets, stage1, supir
from .app_jobs import MODES, PRESETS, SEED, Job
from .devices import DTYPES
from .weights import WEIGHTS_DIR

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local tool: no calls home
import gradio as gr  # noqa: E402

DEVICE = threading.Lock()  # held by the thread doing a job's work: one job per device, even after a cancel
RUNNING: dict[str, threading.Event] = {}  # session -> its running job's cancel switch
DISPLAY_MAX = 2048  # px, the long side of the slider's images (the PNG for download is full size)
NUMBERS = ("upscale", "steps", "cfg", "control_scale", "restore_cfg", "min_size")  # set from the preset


def untouched(payload):
    """The photo input's preprocessing: the uploaded file as gradio stored it. gradio's own opens it with
    PIL's limits and names the server's path in its errors; the job opens it with images.open_image, whose
    header check against the job's settings comes before any decoding. (Set on the component instance: a
    gr.Image subclass would make gradio write a .pyi stub beside this file at import.)"""
    return None if payload is None else payload.path


def preset_view(mode: str, preset: str) -> list:
    """Updates for the fields that depend on the mode: the preset's values (presets.preset, the CLI's
    defaults), and which controls the mode uses. Upscale 0 is the mode's own: fast the network's scale."""
    s = presets.preset(*PRESETS[mode if mode in PRESETS else preset])
    supir_mode = mode != "fast"
    values = {"upscale": s.upscale if supir_mode else 0, "steps": s.steps, "cfg": s.cfg,
              "control_scale": s.control_scale, "restore_cfg": s.restore_cfg, "min_size": s.min_size}
    return [gr.update(value=values[n], interactive=n == "upscale" or supir_mode) for n in NUMBERS] + [
        gr.update(visible=mode in ("two-stage", "repair")),        # SUPIR settings for two-stage / repair
        gr.update(visible=mode in app_jobs.STAGE1_MODES),          # stage-1 network
        gr.update(visible=mode == "repair", open=mode == "repair"),  # the mask
        gr.update(visible=supir_mode),                             # live preview
        gr.update(value=s.color_fix, interactive=supir_mode),
    ]


def needs_line(mode: str, stage1_name: str, status: dict, sdxl: str | None) -> str:
    missing = app_jobs.missing_for(mode, stage1_name, status, sdxl)
    return "Needs: " + "; ".join(f"`{m}`" for m in missing) if missing else "Weights: all here."


def job_from(mode, preset, stage1_name, prompt, upscale, seed, random_seed, steps, cfg, control_scale,
             restore_cfg, color_fix, min_size, tiled, mask_source, painting, loras) -> Job:
    given = {"steps": steps, "cfg": cfg, "control_scale": control_scale, "restore_cfg": restore_cfg,
             "color_fix": color_fix or None, "min_size": min_size}
    given = {k: v for k, v in given.items() if v is not None}
    upscale = upscale or None  # 0: the mode's own
    for name, v in [*given.items(), ("upscale", upscale), ("seed", seed), *(("LoRA scale", s) for _, s in loras)]:
        if isinstance(v, float) and not (v == v and abs(v) != float("inf")):
            raise ValueError(f"{name} must be a finite number, not {v}")
    for name in ("steps", "min_size"):
        if name in given:
            given[name] = int(given[name])
    if tiled:
        given.update(app_jobs.TILED)
    seed = secrets.randbelow(2 ** 31) if random_seed or seed is None else int(seed)
    if not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be in [0, 2^63), not {seed}")
    layers = tuple(p for p in (painting or {}).get("layers") or [] if p) if mask_source == "painted" else ()
    if mode == "repair" and mask_source == "painted" and not layers:
        raise ValueError("no mask painted: paint over the damage on the photo, or pick the automatic mask")
    picked = tuple((name, float(scale if scale is not None else 1.0)) for name, scale in loras if name)
    return Job(mode=mode or Job.mode, preset=preset or Job.preset, stage1=stage1_name or Job.stage1,
               upscale=upscale, prompt=prompt or "", seed=seed, given=tuple(given.items()), loras=picked,
               painted=layers)


def _display(im):
    if max(im.size) <= DISPLAY_MAX:
        return im
    s = DISPLAY_MAX / max(im.size)
    return im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))))


def done_line(job: Job, r: app_jobs.Result) -> str:
    what = job.stage1 if job.mode == "fast" else f"seed {job.seed}"
    return f"done in {r.seconds:.1f} s: {r.image.width}x{r.image.height} px, {MODES[job.mode]} ({what})"


def stream(models: app_jobs.Models, job: Job, photo: str, out_dir: Path, session: str, progress):
    """Run the job in a worker thread and yield the page's outputs (slider, file, status, preview) as it
    reports: per-tile and per-step progress, a latent preview every few steps, then the result or one line."""
    events: queue.Queue = queue.Queue()
    hooks = app_jobs.Hooks(progress=lambda i, n, what: events.put(("progress", (i, n, what))),
                           preview=lambda im: events.put(("preview", im)))

    def work():
        with DEVICE:
            try:
                events.put(("done", app_jobs.run(models, job, Path(photo), out_dir, hooks)))
            except Exception as e:  # noqa: BLE001 — every failure becomes the page's one line
                events.put(("error", e))

    RUNNING[session] = hooks.cancel
    threading.Thread(target=work, daemon=True).start()
    skip = gr.skip()
    try:
        while True:
            kind, value = events.get()
            if kind == "progress":
                progress(value[:2], desc=value[2])
            elif kind == "preview":
                yield skip, skip, skip, value
            elif kind == "error":
                line = app_jobs.error_line(value)
                print(line, file=sys.stderr)
                yield skip, skip, line, skip
                return
            else:
                yield (_display(value.before), _display(value.image)), str(value.path), done_line(job, value), skip
                return
    finally:
        hooks.cancel.set()  # a page that went away stops its job at the next step
        if RUNNING.get(session) is hooks.cancel:
            del RUNNING[session]


def make_restore(models: app_jobs.Models, out_dir: Path):
    def restore(photo, mode="fast", preset="quality", stage1_name=None, prompt=None, upscale=None, seed=SEED,
                random_seed=False, steps=None, cfg=None, control_scale=None, restore_cfg=None, color_fix=None,
                min_size=None, tiled=False, mask_source="auto", painting=None, lora_1=None, scale_1=None,
                lora_2=None, scale_2=None, lora_3=None, scale_3=None, request: gr.Request = None,
                progress=gr.Progress()):
        """Restore one photo; returns (before / after, result PNG, status line, latent preview)."""
        if photo is None:
            yield gr.skip(), gr.skip(), "error: photo: upload a photo first", gr.skip()
            return
        try:
            job = job_from(mode, preset, stage1_name, prompt, upscale, seed, random_seed, steps, cfg,
                           control_scale, restore_cfg, color_fix, min_size, tiled, mask_source, painting,
                           [(lora_1, scale_1), (lora_2, scale_2), (lora_3, scale_3)])
            job.settings()
        except ValueError as e:
            yield gr.skip(), gr.skip(), f"error: settings: {cli.one_line(e)}", gr.skip()
            return
        yield None, None, f"running: {MODES[job.mode]}", None
        yield from stream(models, job, photo, out_dir, request.session_hash, progress)
    return restore


def cancel(request: gr.Request):
    switch = RUNNING.get(request.session_hash)
    if switch is None:
        return gr.skip()
    switch.set()  # the worker stops at its next layer (app_jobs.cancel_points); the page drops the stream
    return "cancelled"


def status_markdown(status: dict) -> str:
    rows = [f"| `{name}` | {'here' if problem is None else problem} |" for name, problem in status.items()]
    return "| weights | |\n|---|---|\n" + "\n".join(rows)


def make_app(args: argparse.Namespace, status: dict | None = None) -> gr.Blocks:
    """The page over a Models of args (--model, --sdxl, --lora-dir, --device, --dtype)."""
    status = app_jobs.weights_status(args.model, args.sdxl) if status is None else status
    models = app_jobs.Models(args.model, args.sdxl, args.lora_dir, args.device, args.dtype)
    out_dir = Path(tempfile.mkdtemp(prefix="mini_supir_app_"))
    lora_names = list(app_jobs.list_loras(models.lora_dir))
    with gr.Blocks(title="mini_supir: restore a photo", delete_cache=(3600, 3600)) as demo:
        gr.Markdown("## Restore a photo\nDrop a photo, pick a mode, press **Restore**. Fast mode runs "
                    "Real-ESRGAN alone, offline (on a CPU about a minute per 512 px photo with x4plus, seconds "
                    "with realesr-animevideov3); the SUPIR modes need its weights and want a GPU.")
        with gr.Row():
            with gr.Column():
                photo = gr.Image(label="Photo", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                 elem_id="photo")
                photo.preprocess = untouched
                mode = gr.Radio([(label, value) for value, label in MODES.items()], value="fast", label="Mode",
                                elem_id="mode")
                needs = gr.Markdown(needs_line("fast", args.stage1, status, args.sdxl), elem_id="needs")
                preset = gr.Dropdown(list(PRESETS), value="quality", label="SUPIR settings", visible=False)
                stage1_name = gr.Dropdown(list(stage1.REGISTRY), value=args.stage1, label="Stage-1 network")
                prompt = gr.Textbox(label="Description (prompt)", placeholder="e.g. an old photo of a harbour")
                with gr.Row():
                    upscale = gr.Number(label="Upscale (0: fast mode the network's scale)", minimum=0, maximum=16)
                    seed = gr.Number(SEED, label="Seed", precision=0, minimum=0)
                    random_seed = gr.Checkbox(False, label="random seed")
                with gr.Accordion("Sampling (a mode change loads its preset)", open=False):
                    with gr.Row():
                        steps = gr.Number(label="Steps", precision=0, minimum=1, maximum=1000)
                        cfg = gr.Number(label="CFG (text guidance)")
                        control_scale = gr.Number(label="Control scale")
                    with gr.Row():
                        restore_cfg = gr.Number(label="Restoration guidance")
                        color_fix = gr.Dropdown(list(presets.COLOR_FIXES), value=None, label="Colour fix")
                        min_size = gr.Number(label="Min size (px)", precision=0, minimum=0)
                    tiled = gr.Checkbox(False, label="Tiling for large photos (VAE tiles, 1024 px sampling windows)")
                with gr.Accordion("Repair mask", open=False, visible=False) as mask_box:
                    mask_source = gr.Radio([("automatic (crack detector)", "auto"), ("painted below", "painted")],
                                           value="auto", label="Mask")
                    painting = gr.ImageEditor(type="filepath", format="png", sources=(), label="Paint over the damage")
                with gr.Accordion(f"LoRAs ({len(lora_names)} in the server's folder)", open=False):
                    loras = []
                    for i in range(3):
                        with gr.Row():
                            loras += [gr.Dropdown(lora_names, value=None, label=f"LoRA {i + 1}"),
                                      gr.Number(1.0, label="scale")]
                with gr.Row():
                    go = gr.Button("Restore", variant="primary", elem_id="restore")
                    stop = gr.Button("Cancel", elem_id="cancel")
            with gr.Column():
                slider = gr.ImageSlider(label="Before / after", type="pil", elem_id="result")
                line = gr.Textbox(label="Status", interactive=False, elem_id="status")
                download = gr.File(label="Result PNG (every setting in its metadata)", elem_id="download")
                preview = gr.Image(label="Live preview (latent)", height=160, visible=False, elem_id="preview")
        with gr.Accordion("Weights on this server", open=False):
            gr.Markdown(status_markdown(status))

        numbers = [upscale, steps, cfg, control_scale, restore_cfg, min_size]
        view = numbers + [preset, stage1_name, mask_box, preview, color_fix]
        # the fields start empty (so the HTTP API's defaults are the preset's too) and the page fills them
        for trigger in (demo.load, mode.change, preset.change):
            trigger(preset_view, [mode, preset], view, queue=False, api_visibility="private")
        for trigger in (mode.change, stage1_name.change):
            trigger(lambda m, s: needs_line(m, s, status, args.sdxl), [mode, stage1_name], needs, queue=False,
                    api_visibility="private")
        # the uploaded photo becomes the canvas to paint the mask on
        photo.change(lambda p: p, photo, painting, queue=False, api_visibility="private")
        inputs = [photo, mode, preset, stage1_name, prompt, upscale, seed, random_seed, steps, cfg, control_scale,
                  restore_cfg, color_fix, min_size, tiled, mask_source, painting, *loras]
        run = go.click(make_restore(models, out_dir), inputs, [slider, download, line, preview], api_name="restore",
                       concurrency_limit=1, concurrency_id="device")
        stop.click(cancel, None, line, cancels=[run], queue=False, api_name="cancel")
    return demo.queue(default_concurrency_limit=1)  # the rest wait, and see their place in the queue


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="A web page for restoring photos (gradio).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                   "only; 0.0.0.0 for the local network)")
    p.add_argument("--port", type=cli.number(int, 1, 65535), default=7860, help="port (default: 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (default: off)")
    p.add_argument("--model", choices=sorted(supir.PRESETS), default="sdxl",
                   help="SUPIR architecture (default: sdxl); tiny without --sdxl = random weights, a smoke test")
    p.add_argument("--sdxl", help="SDXL single file: path, registry name or repo_id/filename (default: sdxl)")
    p.add_argument("--stage1", choices=list(stage1.REGISTRY), default="realesrgan-x4plus",
                   help="the stage-1 network the page starts with (default: realesrgan-x4plus)")
    p.add_argument("--lora-dir", type=Path, default=WEIGHTS_DIR / "loras",
                   help="the folder whose LoRAs the page offers by name (default: weights/loras)")
    p.add_argument("--device", default="auto", help="auto (default), cuda, cuda:1, mps or cpu")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: fp16 on GPU, fp32 on CPU")
    p.add_argument("--max-upload-mb", type=cli.positive, default=50, help="largest upload accepted (default: 50)")
    return p.parse_args(argv)


def launch_options(args: argparse.Namespace) -> dict:
    return dict(server_name=args.host, server_port=args.port, share=args.share,
                max_file_size=int(args.max_upload_mb * 1024 * 1024), show_error=False)


def main(argv=None) -> int:
    args = parse_args(argv)
    demo = make_app(args)
    demo.launch(**launch_options(args))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
