"""Convolutional backbones: the channels-last memory format and where it is not applied."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from nocollapse.models.backbones import ResNetBackbone


def test_channels_last_is_applied_to_a_wide_enough_resnet_only():
    wide = ResNetBackbone("resnet18", 0.25, cifar_stem=True, channels_last=True)       # stages 16..128
    assert wide.channels_last and wide.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    narrow = ResNetBackbone("resnet18", 0.0625, cifar_stem=True, channels_last=True)   # stages 4..32
    assert not narrow.channels_last and narrow.conv1.weight.is_contiguous()
    assert not ResNetBackbone("resnet18", 0.25, cifar_stem=True).channels_last           # not asked for
    x = torch.randn(4, 3, 8, 8)
    assert narrow(x).shape == (4, 32)


def test_a_narrow_resnet_asked_for_channels_last_trains_on_one_thread():
    """On AVX2 CPUs oneDNN's NHWC weight gradient with 4-channel layers and one thread corrupts the
    heap and the process dies (torch 2.14); run in a child process so that a crash fails the test
    instead of ending the test session."""
    code = textwrap.dedent("""
        import torch
        from nocollapse.models.backbones import ResNetBackbone
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = ResNetBackbone("resnet18", 0.0625, cifar_stem=True, channels_last=True)
        for _ in range(20):
            model(torch.randn(128, 3, 8, 8)).square().mean().backward()
        print("trained")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "trained" in result.stdout, result.stderr[-2000:]
