"""`medfm`: a thin command line over the library."""

from __future__ import annotations

import argparse
import sys


def _phantom(args) -> None:
    from .data.phantom import write_phantom_dataset

    folder = write_phantom_dataset(args.output_dir, args.num_images, args.seed, args.size)
    print(f"Wrote {args.num_images} phantoms to {folder} (metadata.jsonl: file_name, text, findings, impression, 14 CheXpert labels)")


def _generate(args) -> None:
    from .generate import generate_images, read_prompts

    if bool(args.prompt) == bool(args.prompts):
        raise SystemExit("medfm generate: give --prompt TEXT (repeatable) or --prompts FILE.jsonl|csv (one of them)")
    paths = generate_images(args.prompt or read_prompts(args.prompts), args.output_dir, adapter=args.adapter,
                            pretrained_model_name_or_path=args.pretrained_model_name_or_path,
                            num_images=args.num_images, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                            negative_prompt=args.negative_prompt, seed=args.seed, batch_size=args.batch_size, resolution=args.resolution)
    print(f"Wrote {len(paths)} images to {args.output_dir}")


def _report(args) -> None:
    import json
    from pathlib import Path

    import torch
    from tqdm.auto import tqdm

    from .data.images import radiograph_files, read_radiograph
    from .data.report_batches import full_instruction
    from .data.studies import to_pil_rgb
    from .generate import adapter_training_config, generate_reports, load_report_model

    if bool(args.image) == bool(args.input_dir):
        raise SystemExit("medfm report: give --image FILE [FILE ...] or --input_dir DIR (one of them)")
    files = [Path(f) for f in args.image] if args.image else radiograph_files(args.input_dir, recursive=True)
    instruction = args.instruction or (adapter_training_config(args.adapter)["instruction"] if args.adapter else None)
    if instruction is None:
        raise SystemExit("medfm report: give --instruction when no --adapter is used")
    images = [to_pil_rgb(read_radiograph(f)) for f in tqdm(files, desc="Reading images", disable=len(files) < 10)]
    studies = [images] if args.as_study else [[image] for image in images]
    model, processor, family = load_report_model(args.adapter, args.pretrained_model_name_or_path)
    torch.manual_seed(args.seed)
    sampling = {"do_sample": args.do_sample, "num_beams": args.num_beams}
    if args.do_sample:
        sampling.update(temperature=args.temperature, top_p=args.top_p)
    reports = generate_reports(model, processor, family, studies, [full_instruction(instruction, args.indication)] * len(studies),
                               batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, **sampling)
    names = [[str(f) for f in files]] if args.as_study else [[str(f)] for f in files]
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"images": n, "report": r, "adapter": args.adapter, "synthetic": True}) + "\n" for n, r in zip(names, reports))
        print(f"Wrote {len(reports)} reports to {args.output}")
    else:
        for n, r in zip(names, reports):
            print(f"{', '.join(n)}:\n{r}\n" if len(reports) > 1 else r)


def _label(args) -> None:
    import json

    from .eval.labeler import label_reports
    from .eval.report_metrics import read_reports

    reports = read_reports(args.file)
    ids = list(reports) if isinstance(reports, dict) else [str(i) for i in range(len(reports))]
    for report_id, labels in zip(ids, label_reports(list(reports.values() if isinstance(reports, dict) else reports))):
        print(json.dumps({"id": report_id, **{k: v for k, v in labels.items() if v is not None}}))


def _eval_reports(args) -> None:
    from .eval.report_metrics import evaluate_reports, format_metrics, pair_reports, read_reports, write_report_evaluation

    ids, references, predictions = pair_reports(read_reports(args.references), read_reports(args.predictions))
    try:
        result = evaluate_reports(references, predictions, bootstrap_samples=args.bootstrap, uncertain=args.uncertain, seed=args.seed,
                                  bertscore_model=args.bertscore_model, clinical=tuple(args.metrics), metrics_dir=args.metrics_dir)
    except ImportError as err:  # a clinical metric's package is not installed: the message names it and the install command
        raise SystemExit(f"medfm eval reports: error: {err}") from err
    path = write_report_evaluation(result, ids, references, predictions, args.output_dir)
    print(format_metrics(result))
    print(f"Wrote {path} and per_report.jsonl")
    _record(args, "reports", result, args.references)


def _eval_utility(args) -> None:
    import json

    from .eval.utility import evaluate_utility, mean_auc, write_utility

    result = evaluate_utility(args.real, args.synthetic, args.labels, size=args.resolution, epochs=args.epochs, seed=args.seed)
    path = write_utility(result, args.output_dir)
    print(json.dumps(result["conditioning_accuracy"], indent=1))
    print(f"mean AUC on held-out real: real only {mean_auc(result['auc_real'])}, real + synthetic {mean_auc(result['auc_real_plus_synthetic'])}")
    print(f"Wrote {path}")
    _record(args, "utility", result, args.real)


def _eval_images(args) -> None:
    import json

    from .eval.images import evaluate_image_folders

    metrics = evaluate_image_folders(args.real, args.generated, args.output_dir, size=args.resolution, extractors=args.feature_extractor,
                                     training_dir=args.training_dir, clip_model=args.clip_model, reid_model=args.reid_model,
                                     nearest_k=args.nearest_k, device=args.device)
    print(json.dumps(metrics, indent=1, default=str)[:4000])
    print(f"Wrote {args.output_dir}/metrics.json and {args.output_dir}/index.html")
    _record(args, "images", metrics, args.real)


def _record(args, kind: str, metrics: dict, data: str) -> None:
    """With --adapter, keep the result in the adapter folder (eval_results.json) and its model card."""
    if args.adapter:
        from .hub import record_evaluation

        print(f"Recorded in {record_evaluation(args.adapter, kind, metrics, data)} and {args.adapter}/README.md")


def _pairs(args) -> None:
    import json

    if args.task == "text-to-image":
        return _image_pairs(args)
    from .sample_pairs import make_preference_pairs

    counts = make_preference_pairs(args.adapter, args.output, num_samples=args.num_samples, reward=args.reward, margin=args.margin,
                                   temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed,
                                   batch_size=args.batch_size, max_studies=args.max_studies, train_data_dir=args.train_data_dir,
                                   train_data_file=args.train_data_file, image_root=args.image_root, phantom_num_images=args.phantom_num_images)
    print(json.dumps(counts))
    print(f"Wrote {counts['pairs']} preference pairs to {args.output} (train on them: --method dpo --train_data_file {args.output})")


def _image_pairs(args) -> None:
    import json

    from .generate import read_prompts
    from .sample_image_pairs import load_scorer, make_image_preference_pairs

    if not args.prompts or not args.scorer:
        raise SystemExit("medfm pairs --task text-to-image needs --prompts (a .jsonl/.csv with `text`) and --scorer (package.module:function)")
    counts = make_image_preference_pairs(args.adapter, [row["text"] for row in read_prompts(args.prompts)], args.output, load_scorer(args.scorer),
                                         num_samples=args.num_samples, margin=args.margin, num_inference_steps=args.num_inference_steps,
                                         guidance_scale=args.guidance_scale, seed=args.seed, resolution=args.resolution)
    print(json.dumps(counts))
    print(f"Wrote {counts['pairs']} image preference pairs to {args.output} (train on them: --task text-to-image --method dpo "
          f"--init_adapter {args.adapter} --train_data_file {args.output})")


def _push(args) -> None:
    from .hub import push_adapter

    print(f"Pushed {args.adapter_dir} to {push_adapter(args.adapter_dir, args.repo_id, args.private, args.commit_message)}")


def _export(args) -> None:
    from .interop import export_kohya

    print(f"Wrote {export_kohya(args.adapter_dir, args.output)} (kohya-ss / A1111 / ComfyUI LoRA)")


def _merge(args) -> None:
    from .interop import merge_adapter

    print(f"Wrote the merged model to {merge_adapter(args.adapter_dir, args.output_dir, args.pretrained_model_name_or_path)}")


def _demo(args) -> None:
    from .demo import launch

    launch(args.index, args.server_name, args.server_port)


def _train(argv: list[str]) -> None:
    from .config import parse_train_config
    from .train import recipe_for

    recipe = recipe_for(parse_train_config(argv))
    recipe.setup()
    recipe.train()
    recipe.save_adapter()
    recipe.cleanup()


def _study_create(args) -> None:
    from .study.create import create_study

    folder = create_study(args.output, args.real, args.synthetic, args.design, args.readers, reports=args.reports, repeats=args.repeats,
                          seed=args.seed, size=args.size, num_cases=args.num_cases, findings=args.findings)
    print(f"Wrote the study to {folder}; reader links (send each reader only their own): {folder / 'private' / 'links.txt'}")


def _study_serve(args) -> None:
    from .study.app import serve

    serve(args.study, args.host, args.port)


def _study_results(args) -> None:
    from .study.results import summary, write_results

    results = write_results(args.study, args.output_dir, args.seed)
    print(summary(results))
    print(f"Wrote results.json, answers.csv and index.html to {args.output_dir or args.study + '/results'}")


def _study_export(args) -> None:
    from .study.export import export_preferences

    counts = export_preferences(args.study, args.pairs, args.instruction)
    print(f"Wrote {counts['pairs']} preference pairs to {counts['output']} (images in {counts['images']}; {counts['ties_skipped']} ties skipped)")


def _study_errors(run):
    """A study command whose input errors (bad folder, design, answers) end with their message, not a traceback."""
    def checked(args) -> None:
        try:
            run(args)
        except (ValueError, FileExistsError) as err:
            raise SystemExit(f"medfm study {args.action}: error: {err}") from err
    return checked


def _add_study_commands(commands) -> None:
    """`medfm study create|serve|results|export`: blinded reader studies (medfm.study)."""
    from .config import DEFAULT_INSTRUCTION

    study = commands.add_parser("study", help="Blinded reader studies of real vs generated radiographs or reports.")
    actions = study.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="Write a study folder: blinded, re-encoded cases and a seeded, balanced order per reader.")
    create.add_argument("output", help="New study folder.")
    create.add_argument("--real", help="Imagefolder (metadata.jsonl: file_name, text) or folder of real radiographs (PNG/JPEG/DICOM).")
    create.add_argument("--synthetic", required=True, help="Imagefolder of generated images (medfm generate writes one) or reports.")
    create.add_argument("--design", choices=["turing", "rating", "pairwise"], required=True)
    create.add_argument("--readers", nargs="+", required=True, help="Reader names; each gets their own order and link.")
    create.add_argument("--reports", action="store_true", help="Cases are radiograph + report (the metadata `text`); readers judge the report.")
    create.add_argument("--repeats", type=int, default=0, help="Items shown twice to each reader, for intra-reader agreement.")
    create.add_argument("--num_cases", type=int, help="Cases per source (turing/rating) or pairs (pairwise); default: all that balance.")
    create.add_argument("--findings", nargs="+", help="Rating: CheXpert findings offered (default: those the prompts name).")
    create.add_argument("--size", type=int, default=512, help="Side in px every case is re-encoded to.")
    create.add_argument("--seed", type=int, default=0)
    create.set_defaults(run=_study_errors(_study_create))
    serve = actions.add_parser("serve", help="Serve the study app (Gradio); answers go to STUDY/answers.sqlite as they are given.")
    serve.add_argument("study")
    serve.add_argument("--host", help="Address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 for readers on the network).")
    serve.add_argument("--port", type=int, help="Port (default: the first free one from 7860).")
    serve.set_defaults(run=_study_errors(_study_serve))
    results = actions.add_parser("results", help="Statistics per reader and pooled: results.json, answers.csv, index.html.")
    results.add_argument("study")
    results.add_argument("--output_dir", help="Default: STUDY/results.")
    results.add_argument("--seed", type=int, default=0, help="Fixes the bootstrap resampling.")
    results.set_defaults(run=_study_errors(_study_results))
    export = actions.add_parser("export", help="Preference pairs from pairwise answers and ratings (TRL format for reports).")
    export.add_argument("study")
    export.add_argument("--pairs", required=True, help="JSONL file to write; images go to a folder beside it.")
    export.add_argument("--instruction", default=DEFAULT_INSTRUCTION, help="Reports: the prompt given with each radiograph.")
    export.set_defaults(run=_study_errors(_study_export))


def build_parser() -> argparse.ArgumentParser:
    from .eval.clinical import METRICS as CLINICAL_METRICS

    parser = argparse.ArgumentParser(prog="medfm", description="LoRA-adapt foundation models to radiology image–report pairs.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="Train a LoRA adapter (same flags as recipes/train_lora.py).", add_help=False)
    train.set_defaults(run=None)

    phantom = commands.add_parser("phantom", help="Write digital chest-radiograph phantoms as an imagefolder dataset.")
    phantom.add_argument("--output_dir", required=True)
    phantom.add_argument("--num_images", type=int, default=100)
    phantom.add_argument("--seed", type=int, default=0)
    phantom.add_argument("--size", type=int, default=256, help="Image side in px.")
    phantom.set_defaults(run=_phantom)

    generate = commands.add_parser("generate", help="Generate radiographs from prompts with a text-to-image adapter.")
    generate.add_argument("--adapter", help="Adapter written by training: a folder or a Hub id (user/name).")
    generate.add_argument("--pretrained_model_name_or_path", help="Base model (default: the one in the adapter's training_config.yaml).")
    generate.add_argument("--prompt", action="append", help="Report text; repeat for several prompts.")
    generate.add_argument("--prompts", help="A .jsonl/.csv of prompts (`text` or `prompt` column; other columns such as labels are kept).")
    generate.add_argument("--negative_prompt")
    generate.add_argument("--num_images", type=int, default=1, help="Images per prompt.")
    generate.add_argument("--num_inference_steps", type=int, default=25)
    generate.add_argument("--guidance_scale", type=float, default=7.5)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--batch_size", type=int, default=8, help="Prompts denoised together.")
    generate.add_argument("--resolution", type=int, help="Image side in px (default: the base's native size).")
    generate.add_argument("--output_dir", default="medfm-generated")
    generate.set_defaults(run=_generate)

    report = commands.add_parser("report", help="Write radiology reports for radiographs (PNG/JPEG/DICOM) with a report adapter.")
    report.add_argument("--adapter", help="Adapter written by report training: a folder or a Hub id (user/name).")
    report.add_argument("--pretrained_model_name_or_path", help="Base model (default: the one in the adapter's training_config.yaml).")
    report.add_argument("--image", nargs="+", help="Radiograph files; each gets its own report unless --as_study.")
    report.add_argument("--input_dir", help="Write a report for every radiograph under this folder.")
    report.add_argument("--output", help="JSONL file, one line per image/study (default: print).")
    report.add_argument("--as_study", action="store_true", help="Treat all --image files as one study (e.g. frontal + lateral).")
    report.add_argument("--instruction", help="Override the instruction the adapter was trained with.")
    report.add_argument("--indication", help="Indication / clinical history added to the prompt.")
    report.add_argument("--batch_size", type=int, default=8)
    report.add_argument("--max_new_tokens", type=int, default=256)
    report.add_argument("--do_sample", action="store_true", help="Sample instead of greedy decoding.")
    report.add_argument("--temperature", type=float, default=0.7)
    report.add_argument("--top_p", type=float, default=0.9)
    report.add_argument("--num_beams", type=int, default=1)
    report.add_argument("--seed", type=int, default=0, help="Fixes sampling.")
    report.set_defaults(run=_report)

    label = commands.add_parser("label", help="CheXpert labels (1 / 0 / -1) of each report in a .jsonl, .csv or .txt file.")
    label.add_argument("file")
    label.set_defaults(run=_label)

    evaluate = commands.add_parser("eval", help="Evaluate generated reports or images.")
    targets = evaluate.add_subparsers(dest="target", required=True)
    reports = targets.add_parser("reports", help="BLEU-1..4, METEOR, ROUGE-L, CIDEr, CheXpert-label F1, with bootstrap 95% CIs.")
    reports.add_argument("--references", required=True, help=".jsonl/.csv (id + report columns) or .txt (one per line).")
    reports.add_argument("--predictions", required=True, help="Same format; matched by id, else by order.")
    reports.add_argument("--output_dir", required=True)
    reports.add_argument("--bootstrap", type=int, default=1000, help="Bootstrap resamples for the 95%% CIs (0: none).")
    reports.add_argument("--uncertain", choices=["negative", "positive"], default="negative", help="How uncertain labels count in F1.")
    reports.add_argument("--seed", type=int, default=0)
    reports.add_argument("--bertscore_model", help="Local model folder for BERTScore (e.g. roberta-large saved with save_pretrained).")
    reports.add_argument("--adapter", help="Adapter folder that wrote the predictions: the result goes into its eval_results.json and model card.")
    reports.add_argument("--metrics", nargs="+", default=[], choices=sorted(CLINICAL_METRICS),
                         help='Clinical metrics from RadEval (pip install "medfm[clinical]"): CheXbert F1 micro/macro over 14 and 5, RadGraph F1, '
                              "GREEN, RaTEScore, RadCliQ-v1; per report and with bootstrap CIs.")
    reports.add_argument("--metrics_dir", help="A Hugging Face cache folder holding the metrics' weights (hf download REPO FILE --cache-dir DIR); "
                                               "read offline. Default: the caches RadEval itself uses.")
    reports.set_defaults(run=_eval_reports)

    images = targets.add_parser("images", help="FID/KID and PRDC per feature extractor, MS-SSIM diversity, image-text alignment, "
                                               "memorization and re-identification, with an HTML report.")
    images.add_argument("--real", required=True, help="Folder of real radiographs (PNG/JPEG/DICOM).")
    images.add_argument("--generated", required=True, help="Folder of generated radiographs (metadata.jsonl prompts enable diversity/CLIP).")
    images.add_argument("--output_dir", required=True)
    images.add_argument("--resolution", type=int, default=128)
    images.add_argument("--feature_extractor", nargs="+", default=["inception"],
                        help="One or more backbones, each reported under its own name: inception (standard FID InceptionV3), a transformers "
                             "vision model by Hub id or folder (microsoft/rad-dino, a SigLIP/MedSigLIP), or an open_clip spec "
                             "(hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224, a folder, ViT-B-32@openai).")
    images.add_argument("--training_dir", help="Training images for the memorization audit.")
    images.add_argument("--clip_model", help="CLIP-like model for image-text alignment: an open_clip spec (BiomedCLIP) or a transformers "
                                             "CLIP/SigLIP id or folder.")
    images.add_argument("--reid_model", help="Folder with a Siamese re-identification network (reid_model.pt TorchScript or reid_model.pt2 "
                                             "torch.export; see medfm/eval/reid.py); needs --training_dir.")
    images.add_argument("--nearest_k", type=int, default=5, help="k of precision/recall/density/coverage (Naeem et al. 2020).")
    images.add_argument("--device", help="Where the feature networks run (default: cuda if available, else cpu).")
    images.add_argument("--adapter", help="Adapter folder that generated the images: the result goes into its eval_results.json and model card.")
    images.set_defaults(run=_eval_images)

    from .eval.utility import DEFAULT_LABELS

    utility = targets.add_parser("utility", help="Conditioning accuracy and downstream AUC of synthetic images (classifier on real labels).")
    utility.add_argument("--real", required=True, help="Imagefolder of real images with CheXpert label columns.")
    utility.add_argument("--synthetic", required=True, help="Imagefolder of generated images (label columns, or prompts in `text`).")
    utility.add_argument("--labels", nargs="+", default=list(DEFAULT_LABELS))
    utility.add_argument("--output_dir", required=True)
    utility.add_argument("--resolution", type=int, default=64)
    utility.add_argument("--epochs", type=int, default=8)
    utility.add_argument("--seed", type=int, default=0)
    utility.add_argument("--adapter", help="Adapter folder that generated the images: the result goes into its eval_results.json and model card.")
    utility.set_defaults(run=_eval_utility)

    from .config import _KeyValues

    pairs = commands.add_parser("pairs", help="Preference pairs for --method dpo: sample reports with an adapter, score them, keep best vs worst.")
    pairs.add_argument("--adapter", required=True, help="Report adapter (folder or Hub id) that samples the reports (text-to-image: the images).")
    pairs.add_argument("--output", required=True, help="JSONL to write (TRL's format: images, prompt, chosen, rejected).")
    pairs.add_argument("--train_data_dir", help="Studies with reference reports, as for training (default: the built-in phantoms).")
    pairs.add_argument("--train_data_file")
    pairs.add_argument("--image_root")
    pairs.add_argument("--phantom_num_images", type=int, default=256, help="Built-in phantoms used when no data is given.")
    pairs.add_argument("--max_studies", type=int, help="Use only the first N studies.")
    pairs.add_argument("--num_samples", type=int, default=4, help="Reports sampled per study.")
    pairs.add_argument("--reward", nargs="+", action=_KeyValues, metavar="NAME=WEIGHT",
                       help="Reward terms (medfm.rewards; default: clinical_micro=1 length=0.2 rougel=0.3).")
    pairs.add_argument("--margin", type=float, default=0.1, help="Keep a study's best vs worst only if their rewards differ by at least this.")
    pairs.add_argument("--temperature", type=float, default=1.0)
    pairs.add_argument("--top_p", type=float, default=1.0)
    pairs.add_argument("--max_new_tokens", type=int, default=128)
    pairs.add_argument("--batch_size", type=int, default=8, help="Studies sampled together.")
    pairs.add_argument("--seed", type=int, default=0, help="Fixes sampling.")
    pairs.add_argument("--task", choices=["report", "text-to-image"], default="report",
                       help="text-to-image: sample images with a text-to-image adapter for --prompts, judge them with --scorer (Diffusion-DPO pairs).")
    pairs.add_argument("--prompts", help="text-to-image: prompts (.jsonl/.csv with a `text` column).")
    pairs.add_argument("--scorer", help="text-to-image: `package.module:function` taking (PIL images, prompts), returning one score per image "
                                        "(higher is better; e.g. 1/0 from a classifier for the asked-for finding).")
    pairs.add_argument("--num_inference_steps", type=int, default=25, help="text-to-image: denoising steps.")
    pairs.add_argument("--guidance_scale", type=float, default=7.5, help="text-to-image only.")
    pairs.add_argument("--resolution", type=int, help="text-to-image: image side in px (default: the base's native size).")
    pairs.set_defaults(run=_pairs)

    push = commands.add_parser("push", help="Upload an adapter folder to a Hub model repo (token from HF_TOKEN or `hf auth login`).")
    push.add_argument("adapter_dir")
    push.add_argument("--repo_id", required=True, help="user/name (created if needed).")
    push.add_argument("--private", action="store_true", help="Create the repo as private.")
    push.add_argument("--commit_message", default="Upload medfm LoRA adapter")
    push.set_defaults(run=_push)

    export = commands.add_parser("export", help="Write a text-to-image adapter in another tool's format.")
    export.add_argument("adapter_dir")
    export.add_argument("--format", choices=["kohya"], required=True, help="kohya: one file for kohya-ss, A1111, ComfyUI (SD 1.x/2.x, SDXL, Flux.1).")
    export.add_argument("--output", help="File to write (default: ADAPTER_DIR/NAME-kohya.safetensors).")
    export.set_defaults(run=_export)

    merge = commands.add_parser("merge", help="Write the base with the LoRA fused in (diffusers pipeline or transformers model folder).")
    merge.add_argument("adapter_dir", help="Adapter folder or Hub id.")
    merge.add_argument("--output_dir", required=True)
    merge.add_argument("--pretrained_model_name_or_path", help="Base model (default: the one in the adapter's training_config.yaml).")
    merge.set_defaults(run=_merge)

    demo = commands.add_parser("demo", help="Start the Gradio demo (prompt → radiograph, radiograph → report) on the shipped adapters.")
    demo.add_argument("--index", help="Adapter index YAML (default: $MEDFM_DEMO_INDEX, else the repository's adapters/index.yaml).")
    demo.add_argument("--server_name", help="Address to bind (default: $GRADIO_SERVER_NAME, else 127.0.0.1: this machine only).")
    demo.add_argument("--server_port", type=int, help="Port (default: $GRADIO_SERVER_PORT, else the first free one from 7860).")
    demo.set_defaults(run=_demo)
    _add_study_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        return _train(argv[1:])
    args = build_parser().parse_args(argv)
    from .data.images import ImageReadError
    from .data.pairs import BadRowError

    try:
        args.run(args)
    except (FileNotFoundError, PermissionError, ImageReadError, BadRowError) as err:  # the user's input: say what, not where in medfm
        raise SystemExit(f"medfm {args.command}: error: {err}") from err


if __name__ == "__main__":
    main()
