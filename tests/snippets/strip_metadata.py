from safetensors.torch import load_file, save_file

# Weights from elsewhere: here the fine-tuned model's tensors without flatlab's metadata, as
# any other training script would save them (save_file(model.state_dict(), ...)).
save_file(load_file("runs/e2e/best.safetensors"), "finetuned.safetensors")
