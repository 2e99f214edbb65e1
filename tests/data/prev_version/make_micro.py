import json
import sys
from importlib import resources

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from npo_cli.tiny import char_tokenizer

data = json.loads(resources.files("npo_cli").joinpath("assets/tiny_config.json").read_text())
data.update(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
cfg = AutoConfig.for_model(**data)
torch.manual_seed(0)
m = AutoModelForCausalLM.from_config(cfg); m.save_pretrained(sys.argv[1]); char_tokenizer().save_pretrained(sys.argv[1])
print(sum(p.numel() for p in m.parameters()))
