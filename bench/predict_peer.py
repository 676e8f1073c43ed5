"""Builds one randomly initialised 3d_fullres network twice, as an nnU-Net v2 model folder and as a
segk model folder with the same weights (PlainConvUNet keys are the same names), so that
`nnUNetv2_predict` and `segk predict` can be timed and their peak memory compared on the same case.
The class count is a parameter (many labels is where nnU-Net's export runs out of RAM).

usage: python bench/predict_peer.py NNUNET_PLANS_JSON SEGK_PLANS_JSON OUT_DIR [classes] [features]
  NNUNET_PLANS_JSON: nnUNetPlans.json from nnUNetv2_plan_and_preprocess of the dataset
  SEGK_PLANS_JSON:   plans.json from `segk plan` of the same dataset (intensity statistics),
                     or - for the nnU-Net folder only (segk predict -m reads it as it is)
  writes OUT_DIR/nnunet_results/DatasetXXX/nnUNetTrainer__nnUNetPlans__3d_fullres and OUT_DIR/segk_model
"""
import copy, json, os, sys
import torch
from safetensors.torch import save_file
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

nn_plans_path, segk_plans_path, out = sys.argv[1], sys.argv[2], sys.argv[3]
classes = int(sys.argv[4]) if len(sys.argv) > 4 else 33
features = [int(f) for f in sys.argv[5].split(",")] if len(sys.argv) > 5 else None
plans = json.load(open(nn_plans_path))
cfg = plans["configurations"]["3d_fullres"]
if features:
    cfg["architecture"]["arch_kwargs"]["features_per_stage"] = features
dataset_name = plans["dataset_name"]
labels = {"background": 0, **{f"l{i}": i for i in range(1, classes)}}
dataset_json = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz"}

pm = PlansManager(plans)
cm = pm.get_configuration("3d_fullres")
torch.manual_seed(0)
net = nnUNetTrainer.build_network_architecture(pm, cm, 1, classes, enable_deep_supervision=False)
sd = {k: v.detach().contiguous() for k, v in net.state_dict().items() if "all_modules" not in k and not k.startswith("decoder.encoder.")}

nn_dir = os.path.join(out, "nnunet_results", dataset_name, "nnUNetTrainer__nnUNetPlans__3d_fullres")
os.makedirs(os.path.join(nn_dir, "fold_0"), exist_ok=True)
json.dump(plans, open(os.path.join(nn_dir, "plans.json"), "w"))
json.dump(dataset_json, open(os.path.join(nn_dir, "dataset.json"), "w"))
torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2),
            "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset_json}},
           os.path.join(nn_dir, "fold_0", "checkpoint_final.pth"))

if segk_plans_path == "-":
    # segk predict reads nnU-Net's model folder itself.
    print(f"{classes} classes, features {cfg['architecture']['arch_kwargs']['features_per_stage']}, patch {cfg['patch_size']}: {nn_dir}")
    sys.exit(0)
segk_dir = os.path.join(out, "segk_model")
os.makedirs(os.path.join(segk_dir, "fold_0"), exist_ok=True)
sp = json.load(open(segk_plans_path))
c = sp["configurations"]["3d_fullres"]
a = cfg["architecture"]["arch_kwargs"]
c["patch_size"] = cfg["patch_size"]
c["spacing"] = cfg["spacing"]
c["topology"] = dict(c["topology"], n_classes=classes, features=a["features_per_stage"], kernels=a["kernel_sizes"], strides=a["strides"])
json.dump(sp, open(os.path.join(segk_dir, "plans.json"), "w"))
json.dump(dataset_json, open(os.path.join(segk_dir, "dataset.json"), "w"))
state = {"epoch": 0, "steps": 0, "next_train_batch": 0, "next_val_batch": 0, "ema_dice": None, "best_ema_dice": None, "seed": 0,
         "bad_in_a_row": 0, "iter": 0, "epoch_loss_sum": 0.0, "epoch_steps": 0, "epoch_skipped": 0, "history": []}
save_file(sd, os.path.join(segk_dir, "fold_0", "checkpoint_final.safetensors"), metadata={"format": "pt", "segk_steps": "0"})
save_file({k: torch.zeros_like(v) for k, v in sd.items()}, os.path.join(segk_dir, "fold_0", "checkpoint_final.state.safetensors"),
          metadata={"segk_steps": "0", "segk_trainer_state": json.dumps(state)})
print(f"{classes} classes, features {a['features_per_stage']}, patch {cfg['patch_size']}: {nn_dir} and {segk_dir}")
