"""Parity of our NIQE with BasicSR 1.4.2's calculate_niqe(convert_to='y') (fixture kind `niqe`)."""
import hashlib

import torch

from fixtures import Fixture, checks
from mini_supir.niqe import PARAMS, niqe


@checks("niqe")
def check_niqe(fx: Fixture):
    # the pristine model we ship must be the one the reference was computed with
    assert hashlib.sha256(PARAMS.read_bytes()).hexdigest() == fx.config["params_sha256"], f"{PARAMS} differs"
    cases = fx.config["cases"]
    assert {f"niqe.{c['index']}" for c in cases} == set(fx.outputs), "config cases and outputs disagree"
    for case in cases:
        k = case["index"]
        image = fx.inputs[f"image.{k}"].numpy()
        fx.check(f"niqe.{k}", torch.tensor([niqe(image, crop_border=case["crop_border"])], dtype=torch.float64))
