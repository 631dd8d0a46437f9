"""The DeepSeek-V3-style model: MLA attention, dense and MoE MLPs, MTP."""
