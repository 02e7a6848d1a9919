"""Tiny, randomly initialised checkpoints in the exact layout RadEval's scorers download from the Hub (file names, repo ids,
state-dict keys, tokenizer files), for serving from tests/hub_server.py. Each builder returns {path in repo: bytes}.

The models are tiny (a few thousand parameters) so the packages' real code paths run in seconds; their scores are
meaningless, which is all a test of the plumbing needs.
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from pathlib import Path

import torch

WORDS = ("no acute cardiopulmonary process the lungs are clear there is a small large moderate mild right left pleural effusion "
         "pneumothorax cardiomegaly consolidation edema atelectasis opacity lower upper lobe heart size normal concerning for "
         "pneumonia tube line in place of or and with without evidence . , : ( ) present seen").split()


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def tiny_bert_config(vocab_size: int):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                      max_position_embeddings=512, initializer_range=1.0)  # wide weights: outputs differ between reports


def bert_base_uncased() -> dict[str, bytes]:
    """`bert-base-uncased` as the Hub has it: config.json, vocab.txt (WordPiece, lower-cased), tokenizer.json, tokenizer_config.json."""
    from transformers import BertTokenizer

    vocab = "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(WORDS)]) + "\n"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.txt").write_text(vocab)
        tokenizer = BertTokenizer(vocab=str(Path(tmp) / "vocab.txt"), do_lower_case=True)
        tokenizer.save_pretrained(Path(tmp) / "repo")
        tiny_bert_config(len(tokenizer)).save_pretrained(Path(tmp) / "repo")
        files = _folder_files(Path(tmp) / "repo")
    files["vocab.txt"] = vocab.encode()
    files["tokenizer_config.json"] = json.dumps({"do_lower_case": True, "model_max_length": 512}).encode()
    return files


def chexbert_pth(bert_files: dict[str, bytes], seed: int = 0) -> bytes:
    """StanfordAIMI/RRG_scorers chexbert.pth: {"model_state_dict": bert.* + linear_heads.0-13.*}, saved from DataParallel ("module.")."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(**{k: v for k, v in json.loads(bert_files["config.json"]).items() if k not in ("architectures", "transformers_version")})
    bert = BertModel(config)
    heads = [torch.nn.Linear(config.hidden_size, 4) for _ in range(13)] + [torch.nn.Linear(config.hidden_size, 2)]
    state = {f"module.bert.{k}": v for k, v in bert.state_dict().items()}
    for i, head in enumerate(heads):
        state |= {f"module.linear_heads.{i}.{k}": v for k, v in head.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"model_state_dict": state, "epoch": 0}, buffer)
    return buffer.getvalue()


def tiny_bert_repo(seed: int = 0) -> dict[str, bytes]:
    """A tiny BERT encoder repo with weights (model.safetensors): what AutoModel.from_pretrained(<encoder id>) reads."""
    from transformers import BertModel

    files = bert_base_uncased()
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        config = tiny_bert_config(len(files["vocab.txt"].decode().split()))
        BertModel(config).save_pretrained(tmp)
        files |= _folder_files(Path(tmp))
    return files


RADGRAPH_ENTITY_LABELS = ("ANAT-DP", "OBS-DP", "OBS-U", "OBS-DA")
RADGRAPH_RELATION_LABELS = ("modify", "located_at", "suggestive_of")


def radgraph_tarball(model_type: str, encoder_repo: str, seed: int = 0) -> bytes:
    """StanfordAIMI/RRG_scorers <model_type>.tar.gz: an AllenNLP/DyGIE archive (config.json, vocabulary/, weights.th) whose
    encoder is `encoder_repo` on the Hub (served by the test). Built with RadEval's own vendored DyGIE classes, so
    the state-dict keys are exactly the ones its RadGraph loads with strict=True. Needs the encoder repo served already."""
    from radeval.metrics.radgraph._vendor.allennlp.data import Vocabulary
    from radeval.metrics.radgraph._vendor.allennlp.modules import text_field_embedders, token_embedders
    from radeval.metrics.radgraph._vendor.dygie.models import dygie

    bert = {"type": "pretrained_transformer_mismatched", "model_name": encoder_repo, "max_length": 512}
    ffn = {"num_layers": 1, "hidden_dims": 8, "dropout": 0.0}
    model = {"type": "dygie", "embedder": {"token_embedders": {"bert": bert}}, "feature_size": 4, "feedforward_params": ffn,
             "initializer": {}, "module_initializer": {}, "loss_weights": {"ner": 0.2, "relation": 1.0, "coref": 0.0, "events": 0.0},
             "max_span_width": 4, "target_task": "relation",
             "modules": {"coref": {"spans_per_word": 0.3, "max_antecedents": 100, "coref_prop": 0}, "ner": {},
                         "relation": {"spans_per_word": 0.5},
                         "events": {"trigger_spans_per_word": 0.3, "argument_spans_per_word": 0.8,
                                    "loss_weights": {"trigger": 1.0, "arguments": 0.5}}}}
    config = {"dataset_reader": {"type": "dygie", "max_span_width": 4, "token_indexers": {"bert": bert}}, "model": model}
    vocab = Vocabulary(non_padded_namespaces=["*labels", "*tags"])
    for namespace, labels in (("ner_labels", RADGRAPH_ENTITY_LABELS), ("relation_labels", RADGRAPH_RELATION_LABELS)):
        vocab.add_tokens_to_namespace(["", *labels], f"{model_type}__{namespace}")
    torch.manual_seed(seed)
    embedder = text_field_embedders.BasicTextFieldEmbedder(
        {"bert": token_embedders.PretrainedTransformerMismatchedEmbedder(model_name=encoder_repo, max_length=512)})
    kwargs = {k: v for k, v in model.items() if k not in ("type", "embedder", "initializer", "module_initializer")}
    network = dygie.DyGIE(vocab=vocab, embedder=embedder, **json.loads(json.dumps(kwargs)))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config, indent=2))
        vocab.save_to_files(str(Path(tmp) / "vocabulary"))
        torch.save(network.state_dict(), Path(tmp) / "weights.th")
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for path in sorted(Path(tmp).rglob("*")):
                tar.add(path, arcname=str(path.relative_to(tmp)), recursive=False)
    return buffer.getvalue()


def tiny_llama_judge(corpus: list[str], max_new_tokens: int = 24, seed: int = 0) -> dict[str, bytes]:
    """A causal LM repo as GREEN loads StanfordAIMI/GREEN-radllama2-7b: LlamaForCausalLM config + safetensors, and a Llama
    (Metaspace BPE) tokenizer trained here on `corpus` (GREEN's prompt and the reports) so prompts stay a few hundred tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    state = json.loads(bpe.to_str())["model"]
    tokenizer = LlamaTokenizer(vocab=state["vocab"], merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]])
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    with tempfile.TemporaryDirectory() as tmp:
        LlamaForCausalLM(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # GREEN asks generate() for max_length=2048, which the 7B judge ends early with </s>; random weights never do, so the
        # repo's own generation_config caps new tokens (transformers lets max_new_tokens win over max_length).
        GenerationConfig(bos_token_id=1, eos_token_id=2, max_new_tokens=max_new_tokens).save_pretrained(tmp)
        return _folder_files(Path(tmp))


def distilroberta_base(seed: int = 0) -> dict[str, bytes]:
    """`distilroberta-base` as RadCliQ's BERTScore loads it (layer 5 of 6): RobertaModel + byte-level BPE vocab.json/merges.txt."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(WORDS)] * 4, vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    state = json.loads(bpe._tokenizer.to_str())["model"]
    tokenizer = RobertaTokenizer(vocab=state["vocab"], merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]],
                                 model_max_length=512)
    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=6, num_attention_heads=2, intermediate_size=32,
                           max_position_embeddings=514, pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1)
    with tempfile.TemporaryDirectory() as tmp:
        RobertaModel(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = _folder_files(Path(tmp))
    files["vocab.json"] = json.dumps(state["vocab"]).encode()
    files["merges.txt"] = ("#version: 0.2\n" + "\n".join(m if isinstance(m, str) else " ".join(m) for m in state["merges"]) + "\n").encode()
    return files


RATE_TYPES = ("ABNORMALITY", "ANATOMY", "DISEASE", "NON-ABNORMALITY", "NON-DISEASE")


def rate_ner_deberta(seed: int = 0) -> dict[str, bytes]:
    """Angelakeke/RaTE-NER-Deberta: DebertaV2ForTokenClassification with RaTEScore's BIO labels in config.id2label, and a
    DeBERTa-v2 (SentencePiece-style Unigram) tokenizer over WORDS."""
    from transformers import DebertaV2Config, DebertaV2ForTokenClassification, DebertaV2Tokenizer

    labels = ["O"] + [f"{prefix}-{kind}" for kind in RATE_TYPES for prefix in ("B", "I")]
    pieces = [("[PAD]", 0.0), ("[UNK]", 0.0), ("[CLS]", 0.0), ("[SEP]", 0.0), ("[MASK]", 0.0)]
    pieces += [(f"\u2581{word}", -1.0) for word in dict.fromkeys(WORDS)] + [(char, -5.0) for char in "abcdefghijklmnopqrstuvwxyz.,:()"]
    tokenizer = DebertaV2Tokenizer(vocab=pieces, do_lower_case=True, model_max_length=512)
    torch.manual_seed(seed)
    config = DebertaV2Config(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                             max_position_embeddings=512, id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
                             initializer_range=1.0)  # wide weights: entities of several types
    with tempfile.TemporaryDirectory() as tmp:
        DebertaV2ForTokenClassification(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return _folder_files(Path(tmp))


def biolord_mpnet(seed: int = 0) -> dict[str, bytes]:
    """FremyCompany/BioLORD-2023-C as RaTEScore loads it (AutoModel, [CLS] state): a tiny MPNetModel + WordPiece vocab."""
    from transformers import MPNetConfig, MPNetModel, MPNetTokenizer

    vocab = {token: i for i, token in enumerate(["<s>", "<pad>", "</s>", "[UNK]", "<mask>", *dict.fromkeys(WORDS)])}
    tokenizer = MPNetTokenizer(vocab=vocab, model_max_length=512)
    torch.manual_seed(seed)
    config = MPNetConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    with tempfile.TemporaryDirectory() as tmp:
        MPNetModel(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return _folder_files(Path(tmp))
