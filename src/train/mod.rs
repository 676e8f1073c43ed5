pub mod sgd;
