"""The DCC network and loss under autocast on a GPU: finite, and close to float32 (issue #8).

One batch of 8 groups of 3 random 160x160 images (C = 16, L_R = 4, every member labelled), the
full DCC loss and its gradients in float32, bf16 and fp16 autocast; prints the loss, the X-metric,
whether every gradient is finite, the gradient norm, and the differences to float32::

    python bench/dcc_amp_check.py            # needs CUDA
"""

from __future__ import annotations

import torch

from dcc.losses import DCCLoss
from dcc.nets import DCCNet


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("dcc_amp_check: needs a CUDA device")
    torch.manual_seed(0)
    device = torch.device("cuda")
    net = DCCNet(2, 4, 3, 16, 4).to(device)
    for head in net.reg_heads.values():  # non-zero heads: every D_r layer gets a gradient
        torch.nn.init.normal_(head.weight, 0, 1e-3)
    images = torch.rand(8, 3, 160, 160, device=device) * 100
    domains = torch.arange(3, device=device).expand(8, -1).contiguous()
    labels = torch.randint(0, 4, (8, 3, 160, 160), device=device)
    rho = torch.nn.functional.one_hot(labels, 4).movedim(-1, 2).float()
    labelled = torch.ones(8, 3, dtype=torch.bool, device=device)
    criterion = DCCLoss(num_classes=4)
    results = {}
    print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        net.zero_grad()
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = net(images, domains)
            loss = criterion(images, out.displacement, out.seg_logits.softmax(2), rho, labelled,
                             labels=labels)
        loss.total.backward()
        grads = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
        results[name] = (loss.total.item(), loss.x_metric.item())
        print(f"{name}: loss {loss.total.item():.5f} ({loss.total.dtype}), X "
              f"{loss.x_metric.item():.5f}, gradients finite {bool(torch.isfinite(grads).all())},"
              f" |gradient| {grads.norm().item():.4e}")
    for name in ("bf16", "fp16"):
        print(f"{name} vs fp32: |d loss| {abs(results[name][0] - results['fp32'][0]):.2e}, "
              f"|d X| {abs(results[name][1] - results['fp32'][1]):.2e}")


if __name__ == "__main__":
    main()
