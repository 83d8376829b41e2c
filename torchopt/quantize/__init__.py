"""torchopt.quantize"""
