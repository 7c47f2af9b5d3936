//! The policy language: schema, parser, compiler, evaluator, limiters and hot reload.
