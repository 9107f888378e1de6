"""TE's fusible-operation API: megatron names these classes in annotations (``TEFusedMLP``);
the stand-in does not implement them (GenLIP's TE spec never builds ``TEFusedMLP``)."""


class FusibleOperation:
    """Base of TE ops (name only)."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError(f"the TE stand-in does not implement te.pytorch.ops."
                                  f"{type(self).__name__}.")


class Sequential(FusibleOperation):
    """Container of fusible ops (name only)."""


SwiGLU = GEGLU = ReGLU = GELU = ReLU = SiLU = BasicLinear = Bias = LayerNorm = RMSNorm = \
    AllReduce = ReduceScatter = Sequential
