"""One training and its parts: models, augmentation, the trainers (in memory and streamed), prediction, difficulty scores by training runs, distillation, evaluation."""
