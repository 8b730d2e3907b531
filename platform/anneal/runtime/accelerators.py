"""`resources.acceleratorType` → the node labels GPU Feature Discovery sets and Ray's accelerator type.

GPU Feature Discovery (GFD, part of NVIDIA's GPU operator) labels each GPU node
``nvidia.com/gpu.product`` with the NVML device name, spaces replaced by ``-`` (and ``-SHARED``
appended under time-slicing): an H100 SXM node is ``NVIDIA-H100-80GB-HBM3``, not ``H100``. A
pod selecting ``nvidia.com/gpu.product: H100`` never schedules. Ray names the same GPU by the
model token of that name (``H100``; `ray.util.accelerators`) and gives each node an
``accelerator_type:<type>`` resource.

So one short name a user writes (``H100``) stands for several products (SXM, PCIe, NVL): the
worker pods get a node affinity ``nvidia.com/gpu.product In [...]`` over all of them, and Ray
the short type. A more specific name (``H100-PCIe``, ``A100-80G``) narrows the products; a
full GFD product value (``NVIDIA-H100-80GB-HBM3``) is taken as it is. A name not in the table
is used verbatim for both: say so with a `nodeSelector` of your own if your nodes differ.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GFD_PRODUCT_LABEL = "nvidia.com/gpu.product"


@dataclass(frozen=True)
class Accelerator:
    """A GPU model: the name users write, Ray's accelerator type, the GFD product label values."""

    name: str
    ray_type: str
    products: tuple[str, ...]

    @property
    def ray_resource(self) -> str:
        """The Ray resource every node with this GPU has (`accelerator_type:H100`)."""
        return f"accelerator_type:{self.ray_type}"


def _a(name: str, ray_type: str, *nvml_names: str) -> Accelerator:
    return Accelerator(name, ray_type, tuple(n.replace(" ", "-") for n in nvml_names))


_H100 = ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL")
_A100_80 = ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe")
_A100_40 = ("NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB")
_V100 = ("Tesla V100-SXM2-16GB", "Tesla V100-SXM2-32GB", "Tesla V100-PCIE-16GB", "Tesla V100-PCIE-32GB")

#: What `acceleratorType` may name, by its canonical spelling (matched without case).
KNOWN: dict[str, Accelerator] = {a.name.upper(): a for a in (
    _a("GB300", "GB300", "NVIDIA GB300"),
    _a("GB200", "GB200", "NVIDIA GB200"),
    _a("B200", "B200", "NVIDIA B200"),
    _a("H200", "H200", "NVIDIA H200", "NVIDIA H200 NVL"),
    _a("H100", "H100", *_H100),
    _a("H100-SXM", "H100", "NVIDIA H100 80GB HBM3"),
    _a("H100-PCIe", "H100", "NVIDIA H100 PCIe"),
    _a("H100-NVL", "H100", "NVIDIA H100 NVL"),
    _a("H20", "H20", "NVIDIA H20"),
    _a("A100", "A100", *_A100_80, *_A100_40),
    _a("A100-80G", "A100", *_A100_80),
    _a("A100-40G", "A100", *_A100_40),
    _a("L40S", "L40S", "NVIDIA L40S"),
    _a("L4", "L4", "NVIDIA L4"),
    _a("A10G", "A10G", "NVIDIA A10G"),
    _a("T4", "T4", "Tesla T4"),
    _a("V100", "V100", *_V100),
)}

_BY_PRODUCT = {p.upper(): a for a in KNOWN.values() for p in a.products if len(a.products) == 1}
#: NVML names start with the vendor line: a value like this is a GFD product already.
_PRODUCT_RE = re.compile(r"^(NVIDIA|Tesla|Quadro)-", re.IGNORECASE)


def resolve(name: str) -> Accelerator:
    """The accelerator `name` (as in ``resources.acceleratorType``) stands for.

    A known short name → its products; a GFD product value → itself, with Ray's type when
    the product is known; anything else → itself for both.
    """
    key = name.strip().upper()
    if key in KNOWN:
        return KNOWN[key]
    if key in _BY_PRODUCT:
        known = _BY_PRODUCT[key]
        return Accelerator(name.strip(), known.ray_type, known.products)
    if _PRODUCT_RE.match(name.strip()):
        # A product the table does not know: Ray's rule, the model token after the vendor.
        token = _PRODUCT_RE.sub("", name.strip()).split("-")[0]
        return Accelerator(name.strip(), token or name.strip(), (name.strip(),))
    return Accelerator(name.strip(), name.strip(), (name.strip(),))


def node_affinity(name: str) -> dict[str, object]:
    """A required node affinity onto the nodes GFD labels with one of `name`'s products."""
    return {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [
        {"key": GFD_PRODUCT_LABEL, "operator": "In", "values": list(resolve(name).products)}]}]}}
