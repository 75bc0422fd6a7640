"""How many image models of the public Keras model zoos lrp_grad explains, and why the rest are refused.

Run (from the repo root, with a virtualenv that holds the zoo packages, see below):
    /tmp/zoo-venv/bin/python benchmarks/zoo_coverage.py [--zoo NAME ...] [--model SUBSTR ...]
                                                        [--jobs 2] [--timeout 300] [--resume] [--out DIR]
Zoos (--zoo): keras-hub (Keras 3), kecam (keras-cv-attention-models, tf-keras), vit-keras (Keras 3),
efficientnet (qubvel, tf-keras and Keras 3), segmentation-models (tf-keras), image-classifiers (tf-keras).

Every model is built with random weights (no download: keras-hub classes constructed from small
configs, never from_preset; kecam pretrained=None; vit-keras pretrained=False; weights=None elsewhere)
at a small input (64x64 first, then 128/224 where a model refuses smaller ones), in its own Python
process with a timeout, one model per process (at most --jobs at once). In that process:
  1. build the model (record the error if it does not build);
  2. lrp_grad.Explainer(model, rule=lrp_grad.AttnLRP()) and one call on a random batch of 2
     (uniform [0, 1) images; target: the predicted class for a classifier, channel 1 summed over
     positions for a feature map or segmentation map);
  3. if that took < 20 s, the same with the default rule (lrp_grad.Explainer(model)).
Recorded per model and rule: explained / refused (UnsupportedLayerError, UnsupportedModelError,
InvalidRuleError: the message's first problem lines and the (layer, class, reason) entries) /
another lrp_grad error / a raw exception (type and first line: a bug to report), whether the
relevance is finite and not all zero, and the seconds. Writes results/zoo_coverage.{json,md}
(the JSON after every model, so an interrupted run keeps what it measured; --resume skips those).

Keras-hub backbones without a classifier task (DINOv2, DINOv3, ViTDet, CLIP/SigLIP vision encoders)
get a small head (pooling + Dense(10)) in a functional wrapper; that is noted in the results.

The virtualenv (the project's own environment is left alone; no tensorflow/keras/numpy change):
    python -m venv --system-site-packages /tmp/zoo-venv
    /tmp/zoo-venv/bin/pip install keras-hub keras-cv-attention-models vit-keras segmentation-models \
        opencv-python-headless
(segmentation-models pulls image-classifiers and efficientnet 1.0.0; vit-keras imports cv2.)
"""
import argparse
import concurrent.futures
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import threading
import time
import traceback
import warnings

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
MARK = "@@ZOO_RESULT@@ "
REFUSALS = ("UnsupportedLayerError", "UnsupportedModelError", "InvalidRuleError")

# ----------------------------------------------------------------------------------------------
# The model list: (zoo, name, spec). spec is read by build() in the child process.
# ----------------------------------------------------------------------------------------------

KECAM = [  # module, constructor: the smallest image-classification variant of each family
    ("aotnet", "AotNet50"), ("beit", "BeitBasePatch16"), ("beit", "ViTTinyPatch16"),
    ("beit", "DINOv2_ViT_Small14"), ("beit", "EVA02TinyPatch14"), ("beit", "FlexiViTSmall"),
    ("beit", "ViT5_Small_Patch16"), ("botnet", "BotNet26T"), ("caformer", "CAFormerS18"),
    ("caformer", "ConvFormerS18"), ("cmt", "CMTTiny"), ("coat", "CoaTLiteTiny"), ("coatnet", "CoAtNet0"),
    ("convnext", "ConvNeXtTiny"), ("convnext", "ConvNeXtV2Atto"), ("cotnet", "CotNet50"),
    ("cspnext", "CSPNeXtTiny"), ("davit", "DaViT_T"), ("edgenext", "EdgeNeXt_XX_Small"),
    ("efficientformer", "EfficientFormerL1"), ("efficientformer", "EfficientFormerV2S0"),
    ("efficientnet", "EfficientNetV1B0"), ("efficientnet", "EfficientNetV2B0"),
    ("efficientnet", "EfficientNetV1Lite0"), ("efficientnet", "EfficientNetEdgeTPUSmall"),
    ("efficientvit", "EfficientViT_M0"), ("efficientvit", "EfficientViT_B0"), ("efficientvit", "EfficientViT_L0"),
    ("fasternet", "FasterNetT0"), ("fastervit", "FasterViT0"), ("fastvit", "FastViT_T8"),
    ("gcvit", "GCViT_XXTiny"), ("ghostnet", "GhostNet_050"), ("ghostnet", "GhostNetV2_100"),
    ("gpvit", "GPViT_L1"), ("halonet", "HaloNetH0"), ("hiera", "HieraTiny"), ("hornet", "HorNetTiny"),
    ("iformer", "IFormerSmall"), ("inceptionnext", "InceptionNeXtTiny"), ("levit", "LeViT128S"),
    ("maxvit", "MaxViT_Tiny"), ("mlp_family", "MLPMixerS32"), ("mlp_family", "ResMLP12"),
    ("mlp_family", "GMLPTiny16"), ("mlp_family", "WaveMLP_T"), ("mobilenetv3_family", "MobileNetV3Small050"),
    ("mobilenetv3_family", "LCNet050"), ("mobilenetv3_family", "FBNetV3B"), ("mobilenetv3_family", "TinyNetE"),
    ("mobilevit", "MobileViT_XXS"), ("mobilevit", "MobileViT_V2_050"), ("moganet", "MogaNetXtiny"),
    ("nat", "NAT_Mini"), ("nat", "DiNAT_Mini"), ("nfnets", "NFNetF0"), ("nfnets", "ECA_NFNetL0"),
    ("pvt", "PVT_V2B0"), ("repvit", "RepViT_M09"), ("resnest", "ResNest50"), ("resnet_family", "ResNeXt50"),
    ("resnet_family", "ResNet50D"), ("resnet_family", "RegNetY040"), ("resnet_family", "RegNetZB16"),
    ("resnet_family", "ResNet51Q"), ("swin_transformer_v2", "SwinTransformerV2Tiny_window8"),
    ("tinyvit", "TinyViT_5M"), ("uniformer", "UniformerSmall32"), ("vanillanet", "VanillaNet5"),
    ("volo", "VOLO_d1"), ("yolov8", "YOLOV8_N_CLS"),
]

HUB = [  # name, what is built (see _hub_model)
    "ViT", "DeiT", "SwinTransformer", "MiT", "DINOV2", "DINOV3", "ViTDet", "CLIPVision", "SigLIPVision",
    "EfficientNetB0", "EfficientNetV2", "MobileNetV3Small", "CSPNet", "ResNetV1", "ResNetV2",
    "DenseNet", "VGG", "Xception", "HGNetV2",
]


def model_list():
    out = [("keras-hub", n, {"hub": n}) for n in HUB]
    out += [("kecam", f"{m}.{f}", {"kecam": (m, f)}) for m, f in KECAM]
    out += [("vit-keras", "vit_b16", {"vit": "vit_b16"}), ("vit-keras", "vit_l32", {"vit": "vit_l32"})]
    out += [("efficientnet", "EfficientNetB0 (tfkeras)", {"effnet": "tfkeras"}),
            ("efficientnet", "EfficientNetB0 (keras)", {"effnet": "keras"})]
    out += [("segmentation-models", f"{a}/{b}", {"sm": (a, b)})
            for a, b in [("Unet", "resnet18"), ("FPN", "resnet18"), ("Linknet", "resnet18"),
                         ("PSPNet", "resnet18"), ("Unet", "mobilenetv2"), ("Unet", "efficientnetb0")]]
    out += [("image-classifiers", n, {"ic": n}) for n in ["resnet18", "seresnet18", "resnext50", "mobilenet"]]
    return out


TF_KERAS_ZOOS = {"kecam", "segmentation-models", "image-classifiers"}

# ----------------------------------------------------------------------------------------------
# Child process: build one model, explain it, print one JSON line.
# ----------------------------------------------------------------------------------------------


def _first_line(e):
    s = str(e).strip()
    return (s.splitlines()[0] if s else "")[:400]


def _hub_model(name, size):
    import keras
    import keras_hub as kh

    M = kh.models
    wrapped = False
    if name == "ViT":
        bb = M.ViTBackbone(image_shape=(size, size, 3), patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
        model = M.ViTImageClassifier(backbone=bb, num_classes=10)
    elif name == "DeiT":
        bb = M.DeiTBackbone(image_shape=(size, size, 3), patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                            intermediate_dim=64)
        model = M.DeiTImageClassifier(backbone=bb, num_classes=10)
    elif name == "SwinTransformer":
        bb = M.SwinTransformerBackbone(image_shape=(size, size, 3), embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                       window_size=4, patch_size=4)
        model = M.SwinTransformerImageClassifier(backbone=bb, num_classes=10)
    elif name == "MiT":
        bb = M.MiTBackbone(layerwise_depths=[1, 1], num_layers=2, layerwise_num_heads=[1, 2],
                           layerwise_sr_ratios=[2, 1], max_drop_path_rate=0.0, layerwise_patch_sizes=[7, 3],
                           layerwise_strides=[4, 2], image_shape=(size, size, 3), hidden_dims=[16, 32])
        model = M.MiTImageClassifier(backbone=bb, num_classes=10)
    elif name == "EfficientNetB0":
        bb = M.EfficientNetBackbone(
            stackwise_kernel_sizes=[3, 3, 5, 3, 5, 5, 3], stackwise_num_repeats=[1, 2, 2, 3, 3, 4, 1],
            stackwise_input_filters=[32, 16, 24, 40, 80, 112, 192],
            stackwise_output_filters=[16, 24, 40, 80, 112, 192, 320],
            stackwise_expansion_ratios=[1, 6, 6, 6, 6, 6, 6], stackwise_squeeze_and_excite_ratios=[0.25] * 7,
            stackwise_strides=[1, 2, 2, 2, 1, 2, 1], stackwise_block_types=["v1"] * 7,
            width_coefficient=1.0, depth_coefficient=1.0, input_shape=(size, size, 3))
        model = M.EfficientNetImageClassifier(backbone=bb, num_classes=10)
    elif name == "EfficientNetV2":
        bb = M.EfficientNetBackbone(
            stackwise_kernel_sizes=[3, 3, 3, 3, 3, 3], stackwise_num_repeats=[1, 2, 2, 3, 3, 4],
            stackwise_input_filters=[24, 24, 48, 64, 128, 160], stackwise_output_filters=[24, 48, 64, 128, 160, 256],
            stackwise_expansion_ratios=[1, 4, 4, 4, 6, 6],
            stackwise_squeeze_and_excite_ratios=[0.0, 0.0, 0, 0.25, 0.25, 0.25],
            stackwise_strides=[1, 2, 2, 2, 1, 2], stackwise_block_types=["fused"] * 3 + ["unfused"] * 3,
            width_coefficient=1.0, depth_coefficient=1.0, input_shape=(size, size, 3))
        model = M.EfficientNetImageClassifier(backbone=bb, num_classes=10)
    elif name == "MobileNetV3Small":
        bb = M.MobileNetBackbone(
            stackwise_expansion=[[40, 56], [64, 144, 144], [72, 72], [144, 288, 288]],
            stackwise_num_blocks=[2, 3, 2, 3],
            stackwise_num_filters=[[16, 16], [24, 24, 24], [24, 24], [48, 48, 48]],
            stackwise_kernel_size=[[3, 3], [5, 5, 5], [5, 5], [5, 5, 5]],
            stackwise_num_strides=[[2, 1], [2, 1, 1], [1, 1], [2, 1, 1]],
            stackwise_se_ratio=[[None, None], [0.25, 0.25, 0.25], [0.3, 0.3], [0.3, 0.25, 0.25]],
            stackwise_activation=[["relu", "relu"], ["hard_swish"] * 3, ["hard_swish"] * 2, ["hard_swish"] * 3],
            stackwise_padding=[[1, 1], [2, 2, 2], [2, 2], [2, 2, 2]],
            output_num_filters=288, depthwise_filters=8, depthwise_stride=2, depthwise_residual=False,
            last_layer_filter=288, squeeze_and_excite=0.5, image_shape=(size, size, 3))
        model = M.MobileNetImageClassifier(backbone=bb, num_classes=10)
    elif name == "CSPNet":
        # the docstring's config does not build (mismatched shapes); a small CSPDarkNet-53-like one
        bb = M.CSPNetBackbone(stem_filters=32, stem_kernel_size=3, stem_strides=1, stackwise_depth=[1, 1, 1],
                              stackwise_strides=[1, 2, 2], stackwise_num_filters=[32, 64, 128],
                              expand_ratio=[2.0, 1.0, 1.0], bottle_ratio=[0.5, 1.0, 1.0], block_ratio=[1.0, 0.5, 0.5],
                              down_growth=True, block_type="dark_block", stage_type="csp", image_shape=(size, size, 3))
        model = M.CSPNetImageClassifier(backbone=bb, num_classes=10)
    elif name == "ResNetV1":
        bb = M.ResNetBackbone(input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 128],
                              stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="bottleneck_block",
                              use_pre_activation=False, image_shape=(size, size, 3))
        model = M.ResNetImageClassifier(backbone=bb, num_classes=10)
    elif name == "ResNetV2":
        bb = M.ResNetBackbone(input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 64, 64],
                              stackwise_num_blocks=[2, 2, 2], stackwise_num_strides=[1, 2, 2], block_type="basic_block",
                              use_pre_activation=True, image_shape=(size, size, 3))
        model = M.ResNetImageClassifier(backbone=bb, num_classes=10)
    elif name == "DenseNet":
        bb = M.DenseNetBackbone(stackwise_num_repeats=[2, 2, 2, 2], image_shape=(size, size, 3))
        model = M.DenseNetImageClassifier(backbone=bb, num_classes=10)
    elif name == "VGG":
        bb = M.VGGBackbone(stackwise_num_repeats=[1, 1, 2], stackwise_num_filters=[16, 32, 64], image_shape=(size, size, 3))
        model = M.VGGImageClassifier(backbone=bb, num_classes=10, pooling="avg")
    elif name == "Xception":
        bb = M.XceptionBackbone(stackwise_conv_filters=[[32, 64], [64, 128], [256, 256]],
                                stackwise_pooling=[True, True, False], image_shape=(size, size, 3))
        model = M.XceptionImageClassifier(backbone=bb, num_classes=10)
    elif name == "HGNetV2":
        bb = M.HGNetV2Backbone(depths=[1, 2, 4], embedding_size=32, hidden_sizes=[64, 128, 256],
                               stem_channels=[3, 16, 32], hidden_act="relu", use_learnable_affine_block=False,
                               stackwise_stage_filters=[(32, 16, 64, 1, 1, 3), (64, 32, 128, 2, 1, 3),
                                                        (128, 64, 256, 4, 1, 3)],
                               apply_downsample=[False, True, True], use_lightweight_conv_block=[False, False, False],
                               image_shape=(size, size, 3))
        model = M.HGNetV2ImageClassifier(backbone=bb, preprocessor=None, num_classes=10)
    else:  # backbones without an image-classifier task: a pooling + Dense(10) head around them
        wrapped = True
        if name == "DINOV2":
            bb = M.DINOV2Backbone(patch_size=14, num_layers=2, hidden_dim=32, num_heads=2, intermediate_dim=64,
                                  image_shape=(56, 56, 3), position_embedding_shape=(56, 56, 3))
        elif name == "DINOV3":
            bb = M.DINOV3Backbone(patch_size=16, num_layers=2, hidden_dim=32, num_heads=2, intermediate_dim=64,
                                  image_shape=(size, size, 3))
        elif name == "ViTDet":
            bb = M.ViTDetBackbone(hidden_size=32, num_layers=2, intermediate_dim=64, num_heads=2,
                                  global_attention_layer_indices=[1], image_shape=(size, size, 3), patch_size=16,
                                  num_output_channels=16, window_size=2)
        elif name == "CLIPVision":
            bb = M.CLIPVisionEncoder(patch_size=16, hidden_dim=32, num_layers=2, num_heads=2, intermediate_dim=64,
                                     image_shape=(size, size, 3))
        elif name == "SigLIPVision":
            bb = M.SigLIPVisionEncoder(patch_size=16, hidden_dim=32, num_layers=2, num_heads=2, intermediate_dim=64,
                                       image_shape=(size, size, 3))
        else:
            raise KeyError(name)
        if isinstance(bb.input, dict):  # DINOv2 {'images'}, DINOv3 {'pixel_values'}: one image input
            (key, t), = bb.input.items()
            inp = keras.Input(t.shape[1:], name=key)
            y = bb({key: inp})
        else:
            inp = keras.Input(bb.input.shape[1:])
            y = bb(inp)
        if isinstance(y, dict):
            y = y.get("sequence_output", next(iter(y.values())))
        if len(y.shape) > 2:
            y = (keras.layers.GlobalAveragePooling1D() if len(y.shape) == 3 else keras.layers.GlobalAveragePooling2D())(y)
        model = keras.Model(inp, keras.layers.Dense(10)(y), name=f"{name.lower()}_with_head")
    return model, wrapped


def _kecam_model(module, fn, size):
    import importlib

    f = getattr(importlib.import_module(f"keras_cv_attention_models.{module}"), fn)
    kw = dict(input_shape=(size, size, 3), num_classes=10, pretrained=None, classifier_activation=None)
    try:
        return f(**kw)
    except TypeError as e:
        if "classifier_activation" not in str(e):
            raise
        kw.pop("classifier_activation")
        return f(**kw)


def build(spec, size):
    """Returns (model, note)."""
    if "hub" in spec:
        model, wrapped = _hub_model(spec["hub"], size)
        return model, "backbone + pooling/Dense(10) head (no classifier task)" if wrapped else ""
    if "kecam" in spec:
        return _kecam_model(*spec["kecam"], size), ""
    if "vit" in spec:
        import vit_keras.vit as vit

        f = getattr(vit, spec["vit"])
        return f(image_size=size, classes=10, pretrained=False, pretrained_top=False, include_top=True), ""
    if "effnet" in spec:
        if spec["effnet"] == "tfkeras":
            import efficientnet.tfkeras as efn
        else:
            import efficientnet.keras as efn
        return efn.EfficientNetB0(weights=None, input_shape=(size, size, 3), classes=10), ""
    if "sm" in spec:
        import segmentation_models as sm

        arch, backbone = spec["sm"]
        return getattr(sm, arch)(backbone, input_shape=(size, size, 3), classes=3, activation="softmax",
                                 encoder_weights=None), "segmentation map (n, H, W, 3): target = channel 1"
    if "ic" in spec:
        from classification_models.tfkeras import Classifiers

        f, _ = Classifiers.get(spec["ic"])
        return f(input_shape=(size, size, 3), classes=10, weights=None), ""
    raise KeyError(spec)


SIZES = {"default": [64, 128, 224]}


def _sizes(zoo, name, spec):
    if "sm" in spec and spec["sm"][0] == "PSPNet":
        return [48, 96, 144]  # PSPNet needs a multiple of 48
    if "vit" in spec:
        return [64, 224] if spec["vit"] == "vit_b16" else [64, 224]
    if "hub" in spec and spec["hub"] in ("ViT", "DeiT", "SwinTransformer", "MiT", "CLIPVision", "SigLIPVision"):
        return [32, 64]
    return SIZES["default"]


def _keras_package(model):
    mod = type(model).__module__
    for cls in type(model).__mro__:
        if cls.__module__.startswith("tf_keras"):
            return "tf-keras"
        if cls.__module__.startswith("keras.") or cls.__module__ == "keras":
            return "keras3"
    return mod.split(".")[0]


def _refusal(e):
    msg = str(e)
    lines = msg.splitlines()
    problems = [ln.strip() for ln in lines if ln.startswith("  - ")]
    entries = [list(t) for t in getattr(e, "layers", [])]
    return {"first_line": lines[0][:400] if lines else "", "problem_lines": [p[:300] for p in problems[:8]],
            "n_problems": len(problems), "entries": [[str(a), str(b), str(c)[:300]] for a, b, c in entries[:30]]}


def _explain(lrp_grad, model, x, rule_name):
    import numpy as np

    res = {"rule": rule_name}
    t0 = time.perf_counter()
    stage = "Explainer()"
    try:
        rule = lrp_grad.AttnLRP() if rule_name == "AttnLRP" else None
        ex = lrp_grad.Explainer(model, rule=rule) if rule is not None else lrp_grad.Explainer(model)
        stage = "model(x)"
        try:
            out = model(x, training=False)
        except Exception as e:  # noqa: BLE001 - the model's own forward fails on this machine (not lrp_grad's)
            res["model_forward_error"] = f"{type(e).__name__}: {_first_line(str(e))[:200]}"
            out = ex.forward(x)  # lrp_grad's forward of the same model
        if isinstance(out, (list, tuple)):
            out = out[0]
        if isinstance(out, dict):
            out = next(iter(out.values()))
        rank = len(out.shape)
        target = None if rank == 2 else 1
        res["output_shape"] = [int(d) for d in out.shape]
        res["output_absmax"] = float(np.max(np.abs(np.asarray(out))))
        stage = "call"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            R = ex(x, target=target)
        R = np.asarray(R)
        res.update(status="explained", finite=bool(np.isfinite(R).all()), nonzero=bool(np.any(R != 0)),
                   rel_sum=float(np.nansum(R)), rel_shape=list(R.shape))
        lw = [f"{w.category.__name__}: {_first_line(w.message)[:200]}" for w in caught
              if w.category.__module__.startswith("lrp_grad")]
        if lw:
            res["lrp_warnings"] = sorted(set(lw))
    except Exception as e:  # noqa: BLE001 - every outcome is recorded
        name = type(e).__name__
        is_lrp = isinstance(e, lrp_grad.LRPError) if hasattr(lrp_grad, "LRPError") else type(e).__module__.startswith("lrp_grad")
        res["stage"] = stage
        res["error_type"] = name
        if name in REFUSALS:
            res["status"] = "refused"
            res.update(_refusal(e))
        elif is_lrp:
            res["status"] = "lrp_error"
            res["first_line"] = _first_line(e)
        else:
            res["status"] = "raw_error"
            res["error_module"] = type(e).__module__
            res["first_line"] = _first_line(e)
            res["traceback_tail"] = traceback.format_exc().splitlines()[-12:]
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def _dedupe(d, a):
    """The default rule's refusal usually repeats AttnLRP's: keep it once."""
    if d.get("status") == "refused" and a.get("status") == "refused" and d.get("entries") == a.get("entries"):
        for k in ("entries", "problem_lines"):
            d.pop(k, None)
        d["same_refusal_as_attnlrp"] = True
    return d


def child(zoo, name):
    spec = dict((n, s) for z, n, s in model_list() if z == zoo)[name]
    rec = {"zoo": zoo, "model": name}
    t0 = time.perf_counter()
    model, note, errors = None, "", []
    for size in _sizes(zoo, name, spec):
        try:
            model, note = build(spec, size)
            rec["input_size"] = size
            break
        except Exception as e:  # noqa: BLE001
            errors.append(f"{size}: {type(e).__name__}: {_first_line(e)}")
            if isinstance(e, (ImportError, KeyError, AttributeError)):
                break
    rec["build_seconds"] = round(time.perf_counter() - t0, 2)
    if model is None:
        rec.update(built=False, build_error=errors[-1] if errors else "?", build_errors=errors)
        return rec
    if note:
        rec["note"] = note
    if errors:
        rec["smaller_sizes_failed"] = errors
    rec["input_size"] = int(model.input_shape[1]) if isinstance(model.input_shape, tuple) else rec["input_size"]
    rec.update(built=True, keras_package=_keras_package(model), model_class=f"{type(model).__module__}.{type(model).__name__}",
               params=int(model.count_params()), n_layers=len(model.layers))
    import numpy as np

    sys.path.insert(0, str(ROOT))
    import lrp_grad

    shape = [2] + [int(d) for d in model.input_shape[1:]]
    x = np.random.default_rng(0).uniform(0, 1, size=shape).astype("float32")
    rec["attnlrp"] = _explain(lrp_grad, model, x, "AttnLRP")
    if rec["attnlrp"]["seconds"] < 20:
        rec["default"] = _dedupe(_explain(lrp_grad, model, x, "default"), rec["attnlrp"])
    return rec


def _child_main(zoo, name):
    try:
        rec = child(zoo, name)
    except Exception as e:  # noqa: BLE001
        rec = {"zoo": zoo, "model": name, "harness_error": f"{type(e).__name__}: {_first_line(e)}",
               "traceback_tail": traceback.format_exc().splitlines()[-10:]}
    print(MARK + json.dumps(rec), flush=True)


# ----------------------------------------------------------------------------------------------
# Parent: run the children, aggregate, write json + md.
# ----------------------------------------------------------------------------------------------


def _run_one(zoo, name, timeout):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", PYTHONHASHSEED="0",
               OMP_NUM_THREADS="1", TF_NUM_INTEROP_THREADS="1", TF_NUM_INTRAOP_THREADS="1")
    if zoo in TF_KERAS_ZOOS:
        env["TF_USE_LEGACY_KERAS"] = "1"
        env["SM_FRAMEWORK"] = "tf.keras"
    elif zoo == "efficientnet" and "tfkeras" in name:
        env["TF_USE_LEGACY_KERAS"] = "1"
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), "--_child", zoo, name],
                           cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=timeout)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith(MARK)]
        if lines:
            rec = json.loads(lines[-1][len(MARK):])
        else:
            rec = {"zoo": zoo, "model": name, "harness_error": f"process exited {p.returncode} without a result",
                   "stderr_tail": p.stderr.splitlines()[-8:]}
    except subprocess.TimeoutExpired:
        rec = {"zoo": zoo, "model": name, "timeout": timeout}
    rec["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return rec


def outcome(rec):
    """One word per model: not_built, explained, refused, lrp_error, raw_error, timeout, harness."""
    if "timeout" in rec:
        return "timeout"
    if "harness_error" in rec:
        return "harness"
    if not rec.get("built"):
        return "not_built"
    st = rec["attnlrp"]["status"]
    if st == "explained" and not (rec["attnlrp"]["finite"] and rec["attnlrp"]["nonzero"]):
        return "explained_bad"
    return st


def blocker_keys(entry):
    layer, cls, why = entry
    m = re.match(r"operation ([\w\.]+) has no LRP handler", why)
    if m:
        return f"op {m.group(1)}"
    if why.startswith("no handler for this layer class"):
        m = re.search(r"looking inside its call failed at (\w+)", why)
        return f"{cls} (no handler{'; look-inside failed: ' + m.group(1) if m else ''})"
    return f"{cls}: {re.sub(r'[0-9]+', 'N', why)[:90]}"


def write_results(recs, out):
    out.mkdir(parents=True, exist_ok=True)
    recs = sorted(recs, key=lambda r: (r["zoo"], r["model"]))
    (out / "zoo_coverage.json").write_text(json.dumps({"machine": _machine(), "models": recs}, indent=1))
    zoos = sorted({r["zoo"] for r in recs})
    cols = ["models", "built", "explained", "refused", "lrp_error", "raw_error", "timeout", "not_built", "harness",
            "default rule: explained/run"]
    md = ["# Model-zoo coverage of lrp_grad", "",
          "Generated by `benchmarks/zoo_coverage.py` (random weights, small inputs, batch of 2, rule `AttnLRP()`;",
          "`default` = `Explainer(model)` where the AttnLRP pass took under 20 s). One process per model.", "",
          f"Machine: {_machine()}", "", "## Per zoo (rule AttnLRP)", "",
          "| zoo | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    tot = {c: 0 for c in cols}
    for z in zoos:
        rz = [r for r in recs if r["zoo"] == z]
        row = {c: 0 for c in cols}
        row["models"] = len(rz)
        dflt = [r["default"] for r in rz if r.get("default")]
        row["default rule: explained/run"] = f"{sum(e['status'] == 'explained' for e in dflt)}/{len(dflt)}"
        for r in rz:
            o = outcome(r)
            row["built"] += bool(r.get("built"))
            key = "explained" if o in ("explained", "explained_bad") else o
            row[key] = row.get(key, 0) + 1
        for c in cols[:-1]:
            tot[c] += row[c]
        a, b = row[cols[-1]].split("/")
        ta, tb = str(tot[cols[-1]] or "0/0").split("/")
        tot[cols[-1]] = f"{int(a) + int(ta)}/{int(b) + int(tb)}"
        md.append(f"| {z} | " + " | ".join(str(row[c]) for c in cols) + " |")
    md.append("| **all** | " + " | ".join(f"**{tot[c]}**" for c in cols) + " |")
    bad = [r for r in recs if outcome(r) == "explained_bad"]
    md += ["", f"Explained but relevance not finite or all zero: {len(bad)}"
           + (": " + ", ".join(f"{r['zoo']}/{r['model']} (max |output| {r['attnlrp'].get('output_absmax', '?'):.3g}"
                                f"{'; ' + r['attnlrp']['lrp_warnings'][0][:60] if r['attnlrp'].get('lrp_warnings') else ''})"
                                if isinstance(r['attnlrp'].get('output_absmax'), float) else f"{r['zoo']}/{r['model']}"
                                for r in bad) if bad else "."),
           "(An all-zero map with a max |output| near 0 is the random weights' vanishing logits absorbed by the",
           "stabiliser, which lrp_grad warns about, not a failure to explain.)", ""]
    # blockers
    groups = {}
    for r in recs:
        for rule in ("attnlrp",):
            e = r.get(rule)
            if not e or e.get("status") != "refused":
                continue
            keys = {}
            for ent in e.get("entries") or []:
                keys.setdefault(blocker_keys(ent), ent)
            if not keys:
                keys[f"{e['error_type']}: {e['first_line'][:100]}"] = ["", "", e["first_line"]]
            for k, ent in keys.items():
                g = groups.setdefault(k, {"models": [], "only": 0, "example": f"{ent[0]!r} ({ent[1]}): {ent[2]}"})
                g["models"].append(f"{r['zoo']}/{r['model']}")
                g["only"] += len(keys) == 1
    md += ["## Blockers (refusals with AttnLRP, grouped by operation / layer class)", "",
           "A model refused for several reasons counts under each; `sole` = models for which it is the only reason.", "",
           "| blocker | models blocked | sole | example | models |", "|---|---|---|---|---|"]
    for k, g in sorted(groups.items(), key=lambda kv: (-len(kv[1]["models"]), kv[0])):
        ex = g["example"].replace("|", "\\|").replace("\n", " ")[:300]
        md.append(f"| `{k}` | {len(g['models'])} | {g['only']} | {ex} | {', '.join(g['models'])} |")
    md += ["", "## Raw exceptions (not an lrp_grad error: bugs to report)", ""]
    raws = []
    for r in recs:
        for rule in ("attnlrp", "default"):
            e = r.get(rule)
            if e and e.get("status") == "raw_error":
                raws.append(f"- {r['zoo']}/{r['model']} [{e['rule']}, at {e['stage']}]: `{e['error_module']}.{e['error_type']}`: "
                            f"{e['first_line'][:300]}")
    md += raws or ["none"]
    md += ["", "## Other outcomes", ""]
    other = []
    for r in recs:
        o = outcome(r)
        if o == "not_built":
            other.append(f"- not built: {r['zoo']}/{r['model']}: {r['build_error'][:300]}")
        elif o == "timeout":
            other.append(f"- timeout ({r['timeout']} s): {r['zoo']}/{r['model']}")
        elif o == "harness":
            other.append(f"- harness error: {r['zoo']}/{r['model']}: {r['harness_error'][:300]}")
        elif o == "lrp_error":
            e = r["attnlrp"]
            other.append(f"- lrp_grad error {e['error_type']}: {r['zoo']}/{r['model']}: {e['first_line'][:300]}")
    md += other or ["none"]
    md += ["", "## Every model", "",
           "| zoo | model | keras | input | params | AttnLRP | s | default | s | note |", "|---" * 10 + "|"]
    for r in recs:
        def cell(e):
            if not e:
                return "-", ""
            s = e["status"]
            if s == "explained":
                s = "ok" if e["finite"] and e["nonzero"] else f"ok but finite={e['finite']} nonzero={e['nonzero']}"
            elif s in ("refused", "lrp_error", "raw_error"):
                s = f"{s}: {e['error_type']}"
            return s, str(e["seconds"])
        a, asec = cell(r.get("attnlrp"))
        d, dsec = cell(r.get("default"))
        note = r.get("note", "")
        if not r.get("built"):
            a = outcome(r)
            note = (r.get("build_error") or r.get("harness_error") or "")[:120].replace("|", "\\|")
        md.append(f"| {r['zoo']} | {r['model']} | {r.get('keras_package', '')} | {r.get('input_size', '')} | "
                  f"{r.get('params', '')} | {a} | {asec} | {d} | {dsec} | {note} |")
    (out / "zoo_coverage.md").write_text("\n".join(md) + "\n")


def _machine():
    try:
        from importlib.metadata import version as v

        pk = {p: v(p) for p in ["tensorflow", "keras", "tf_keras", "numpy", "keras-hub", "keras-cv-attention-models",
                                "vit-keras", "efficientnet", "segmentation-models", "image-classifiers"]}
    except Exception:  # noqa: BLE001
        pk = {}
    return f"{platform.platform()}, {os.cpu_count()} cores, python {platform.python_version()}; " + ", ".join(
        f"{k} {w}" for k, w in pk.items())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", nargs="*", default=None)
    ap.add_argument("--model", nargs="*", default=None, help="substrings of model names to run")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=240)
    ap.add_argument("--resume", action="store_true", help="keep the results in --out and run only the missing models")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._child:
        _child_main(*a._child)
        return
    out = pathlib.Path(a.out)
    todo = [(z, n) for z, n, _ in model_list() if (not a.zoo or z in a.zoo)
            and (not a.model or any(s.lower() in n.lower() for s in a.model))]
    recs = {}
    jf = out / "zoo_coverage.json"
    if jf.exists():  # keep the other models' results; rerun the selected ones unless --resume
        for r in json.loads(jf.read_text())["models"]:
            recs[(r["zoo"], r["model"])] = r
    if a.resume:
        todo = [t for t in todo if t not in recs]
    lock = threading.Lock()
    print(f"{len(todo)} models, {a.jobs} at a time, timeout {a.timeout} s", flush=True)
    with concurrent.futures.ThreadPoolExecutor(a.jobs) as pool:
        futs = {pool.submit(_run_one, z, n, a.timeout): (z, n) for z, n in todo}
        for f in concurrent.futures.as_completed(futs):
            r = f.result()
            with lock:
                recs[(r["zoo"], r["model"])] = r
                write_results(list(recs.values()), out)
            e = r.get("attnlrp") or {}
            print(f"{r['zoo']:20s} {r['model']:40s} {outcome(r):12s} {e.get('error_type', '')} "
                  f"{r['wall_seconds']} s", flush=True)
    write_results(list(recs.values()), out)


if __name__ == "__main__":
    main()
