"""Parity of our LPIPS (AlexNet, v0.1) with the lpips package (fixture kind `lpips_alex`)."""
import torch

from fixtures import Fixture, checks
from mini_supir.metrics import LPIPS, lpips_state_dict


@checks("lpips_alex")
def check_lpips_alex(fx: Fixture):
    with torch.device("meta"):
        model = LPIPS()
    model.load_state_dict(lpips_state_dict(fx.weights), strict=True, assign=True)
    model.eval()
    pairs = sorted({name.split(".")[0] for name in fx.inputs})
    with torch.no_grad():
        for i in pairs:
            in0, in1 = fx.inputs[f"{i}.in0"], fx.inputs[f"{i}.in1"]
            distance, layers = model(in0, in1, return_layers=True)
            outputs = {f"{i}.lpips": distance,
                       f"{i}.lpips_normalize": model((in0 + 1) / 2, (in1 + 1) / 2, normalize=True),
                       f"{i}.self": model(in0, in0)}
            outputs.update({f"{i}.layer.{k}": term for k, term in enumerate(layers)})
            fx.check_all({name: value.view(-1, 1, 1, 1) for name, value in outputs.items()}, prefix=f"{i}.")
