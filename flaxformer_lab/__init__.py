"""flaxformer_lab: the transformer family tree in Flax linen."""
