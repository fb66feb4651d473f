"""Full-size key layout: SUPIR built on the meta device has exactly the official checkpoints' keys and shapes."""
import json

from fixtures import Fixture, checks
from mini_supir import supir


@checks("manifests")
def check_manifests(fx: Fixture):
    expected = {}
    for name in fx.config["files"]:
        expected.update(json.loads((fx.path / name).read_text())["keys"])
    ours = supir.build(supir.SDXL, "meta").state_dict()
    assert sorted(set(ours) - set(expected)) == [], "keys the official files do not have"
    assert sorted(set(expected) - set(ours)) == [], "official keys we do not have"
    wrong = [f"{k} {list(v.shape)} != {expected[k]['shape']}" for k, v in ours.items() if list(v.shape) != expected[k]["shape"]]
    assert wrong == [], wrong[:4]
    dtypes = [k for k, v in ours.items() if str(v.dtype).removeprefix("torch.") != expected[k]["dtype"]]
    assert dtypes == [], dtypes[:4]
    fx.errors["keys"] = 0.0
